"""The index directory: passage embeddings in resumable shards, plus metadata tying them to an encoder and corpus.

Layout of `index_dir/`:
  index.json              metadata: encoder_id, dim, dtype, num_passages, shard_size, num_hosts, shards (file,
                          first row, rows, building host), passages file (path and fingerprint), complete flag,
                          backends (e.g. ScaNN searchers' parameters)
  embeddings-00000.npy    the N x D matrix in row order, at most shard_size rows a file (bfloat16 is stored as its
                          uint16 bit pattern, since .npy has no bfloat16)
  index.host-00001-of-00004.json   progress of host 1 of a 4-host build (only that host writes it)
  passage_*.npy/json      the PassageStore (byte offsets, id lookup) for the passages file
  scann/                  optional serialised ScaNN searcher(s) (see scann_backend.py)

Building on several hosts at once (num_hosts = H): the rows are cut into H contiguous host ranges (`host_rows`),
the rows that a corpus axis over all devices puts on each host's devices, and every host writes only the shard
files of its own range and its own progress file, so writers never touch the same file and, at training time,
a host reads only the files it wrote. Each range is cut into files of at most shard_size rows (with H > 1 a
host's last file may be short); files are numbered in row order over all hosts. index.json, whose content only
depends on the layout, is written once every host's part is complete: by the writer that finishes last when
the hosts share a filesystem, or by each host after a barrier (`write_index_metadata`).

Every file is written to a temporary name and renamed, so a killed embedding job leaves only whole shards and
`IndexWriter` resumes after the last one (per host).
"""

from __future__ import annotations

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
# Fields that must agree between runs resuming one directory (and between the hosts of one build), with the
# value an index written before multi-host building implies.
_LAYOUT_FIELDS = {"version": None, "encoder_id": None, "dim": None, "dtype": None, "shard_size": None,
                  "passages_fingerprint": None, "num_hosts": 1, "devices_per_host": 1}


class IndexFormatError(ValueError):
    """An index directory cannot be written or loaded as asked; the message names the field and the remedy."""


def shard_file(i: int) -> str:
    return f"embeddings-{i:05d}.npy"


def host_progress_file(host_index: int, num_hosts: int) -> str:
    return f"index.host-{host_index:05d}-of-{num_hosts:05d}.json"


def host_rows(num_passages: int, num_hosts: int, host_index: int, devices_per_host: int = 1) -> tuple[int, int]:
    """Rows [start, stop) that host `host_index` of `num_hosts` embeds and stores.

    They are the rows that splitting the corpus evenly (padded at the end) over num_hosts * devices_per_host
    devices gives that host's devices when they are consecutive along the corpus axis, as they are on CPU/GPU
    meshes built in device order; ranges are contiguous, in host order, and may be empty for tiny corpora.
    """
    if not 0 <= host_index < num_hosts or devices_per_host < 1:
        raise IndexFormatError(f"host_index={host_index} must be in [0, num_hosts={num_hosts}) and "
                               f"devices_per_host={devices_per_host} positive")
    block = devices_per_host * -(-num_passages // (num_hosts * devices_per_host))
    return min(num_passages, host_index * block), min(num_passages, (host_index + 1) * block)


def shard_layout(num_passages: int, shard_size: int, num_hosts: int = 1, devices_per_host: int = 1
                 ) -> list[dict[str, Any]]:
    """Every shard file of an index in row order: {"file", "start" (first row), "rows", "host" (who writes it)}."""
    shards: list[dict[str, Any]] = []
    for host in range(num_hosts):
        start, stop = host_rows(num_passages, num_hosts, host, devices_per_host)
        for first in range(start, stop, shard_size):
            shards.append({"file": shard_file(len(shards)), "start": first, "rows": min(shard_size, stop - first),
                           "host": host})
    return shards


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{path}: not valid JSON ({e}); delete the index directory and rebuild it") from None


def _read_metadata(index_dir: str) -> dict[str, Any] | None:
    return _read_json(os.path.join(index_dir, METADATA_FILE))


def write_metadata(index_dir: str, metadata: dict[str, Any]) -> None:
    """Atomically replaces index.json (also used by backends to record themselves under "backends")."""
    corpus._atomic_write_json(os.path.join(index_dir, METADATA_FILE), metadata)


class IndexWriter:
    """Appends passage embeddings (in row order) to an index directory, resuming an interrupted run.

    Usage (the embedding job; on each of H hosts at once with host_index=h, num_hosts=H):
      writer = IndexWriter(out_dir, encoder_id, dim, None, shard_size, passages_path, dtype="float16")
      for passages in batches(writer.passages.iter_passages(writer.rows_done, writer.stop_row)):
        writer.write(encode(passages))         # emb_BxD, any B
      writer.finalize()

    On construction the passage store is built (or reused) in `output_dir`; `rows_done` is the row after the last
    whole shard of this host already on disk, i.e. where to restart. Rows written since the last whole shard are
    held in memory and lost if the job dies, which costs at most one shard of recomputation.
    """

    def __init__(self, output_dir: str | os.PathLike, encoder_id: str, dim: int, num_passages: int | None,
                 shard_size: int, passages_path: str | os.PathLike, dtype: str = "float32", *, host_index: int = 0,
                 num_hosts: int = 1, devices_per_host: int = 1):
        """encoder_id: any string identifying the document encoder (name + checkpoint fingerprint); an index is
        only reused for the same one. num_passages: None takes the count from the passages file, otherwise it must
        agree. dtype: "float32", "float16" or "bfloat16" storage of the embeddings. host_index / num_hosts: this
        writer's part of a build on several hosts (see `host_rows`); devices_per_host: accelerators per host of the
        job that will load the index (it places the host boundaries; irrelevant with one host)."""
        self.output_dir = os.fspath(output_dir)
        if dtype not in DTYPES:
            raise IndexFormatError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if dim <= 0 or shard_size <= 0:
            raise IndexFormatError(f"dim ({dim}) and shard_size ({shard_size}) must be positive")
        if not 0 <= host_index < num_hosts or devices_per_host < 1:
            raise IndexFormatError(f"host_index={host_index} must be in [0, num_hosts={num_hosts}) and "
                                   f"devices_per_host={devices_per_host} positive")
        if not os.path.isfile(passages_path):
            raise IndexFormatError(f"{passages_path}: passages file not found")
        os.makedirs(self.output_dir, exist_ok=True)
        self.dim, self.shard_size, self.dtype = int(dim), int(shard_size), dtype
        self.host_index, self.num_hosts = int(host_index), int(num_hosts)
        self.metadata = {
            "version": INDEX_VERSION, "encoder_id": encoder_id, "dim": self.dim, "dtype": dtype,
            "num_passages": num_passages, "shard_size": self.shard_size, "num_hosts": self.num_hosts,
            "devices_per_host": int(devices_per_host) if num_hosts > 1 else 1,
            "passages_path": os.path.abspath(passages_path),
            "passages_fingerprint": corpus.file_fingerprint(passages_path),
            "complete": False, "shards": [], "backends": {}}
        # One host: index.json is also the progress record. Several: each host only ever writes its own file.
        self._progress_path = os.path.join(
            self.output_dir, METADATA_FILE if num_hosts == 1 else host_progress_file(host_index, num_hosts))
        # Check a previous run's metadata before (re)building the passage store, which would overwrite its own.
        old = _read_json(self._progress_path)
        for previous in (old, _read_metadata(self.output_dir)):
            if previous is not None:
                self._check_resumable(previous, num_passages_known=num_passages is not None)
        self.passages = corpus.PassageStore.build(passages_path, self.output_dir)
        if num_passages is not None and num_passages != self.passages.num_passages:
            raise IndexFormatError(f"num_passages={num_passages} but {passages_path} holds "
                                   f"{self.passages.num_passages} passages; pass None to take the file's count")
        self.num_passages = self.metadata["num_passages"] = self.passages.num_passages
        if old is not None:  # Same file (by fingerprint), maybe moved: remember where it is now.
            self.metadata = {**old, "passages_path": self.metadata["passages_path"]}
        self.start_row, self.stop_row = host_rows(self.num_passages, self.num_hosts, self.host_index,
                                                  self.metadata["devices_per_host"])
        self._layout = shard_layout(self.num_passages, self.shard_size, self.num_hosts,
                                    self.metadata["devices_per_host"])
        self._own = [s for s in self._layout if s["host"] == self.host_index]
        if num_hosts > 1:
            self.metadata.update(host_index=self.host_index, host_rows=[self.start_row, self.stop_row])
        self._shards_done = self._count_whole_shards()
        # A shard lost since a complete run (deleted to be rebuilt) makes this part incomplete again.
        self.metadata["complete"] = bool(self.metadata["complete"]) and self.rows_done == self.stop_row
        corpus._atomic_write_json(self._progress_path, self.metadata)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.index_written = False  # Set by finalize() once index.json describes the whole, complete index.

    def _check_resumable(self, old: dict[str, Any], num_passages_known: bool) -> None:
        where = os.path.join(self.output_dir, METADATA_FILE)
        fields = list(_LAYOUT_FIELDS) + (["num_passages"] if num_passages_known else [])
        for field in fields:
            if old.get(field, _LAYOUT_FIELDS.get(field)) != self.metadata[field]:
                raise IndexFormatError(
                    f"{where}: this directory holds an index with {field}={old.get(field)!r}, but this run has "
                    f"{field}={self.metadata[field]!r}; use a fresh output directory (or delete this one) instead of "
                    "resuming into it")

    def _count_whole_shards(self) -> int:
        names = os.listdir(self.output_dir)
        for entry in self._own:  # Leftovers of this host's writes that were killed before their rename.
            for name in names:
                if name.startswith(entry["file"] + ".") and name.endswith(".tmp"):
                    os.remove(os.path.join(self.output_dir, name))
        done = 0
        for entry in self._own:
            path = os.path.join(self.output_dir, entry["file"])
            if not os.path.exists(path):
                break
            arr = np.load(path, mmap_mode="r")
            want = (entry["rows"], self.dim)
            if arr.shape != want or arr.dtype != _STORAGE_DTYPES[self.dtype]:
                raise IndexFormatError(f"{path}: shape {arr.shape} dtype {arr.dtype}, expected {want} "
                                       f"{_STORAGE_DTYPES[self.dtype]}; delete the index directory and rebuild it")
            done += 1
        return done

    @property
    def rows_done(self) -> int:
        """The row after this host's whole shards on disk: where to restart embedding (stop_row when done)."""
        return self._own[self._shards_done]["start"] if self._shards_done < len(self._own) else self.stop_row

    def _limit(self) -> str:
        if self.num_hosts == 1:
            return f"num_passages={self.num_passages}"
        return (f"row {self.stop_row}, the end of host {self.host_index}'s rows [{self.start_row}, {self.stop_row}) "
                f"of num_passages={self.num_passages}")

    def write(self, embeddings_NxD) -> None:
        """Appends the embeddings of the next N rows (numpy or jax array; cast to the index dtype)."""
        emb = np.asarray(embeddings_NxD)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise IndexFormatError(f"write() got embeddings of shape {emb.shape}; expected (N, {self.dim})")
        if self.rows_done + self._buffered + emb.shape[0] > self.stop_row:
            raise IndexFormatError(f"write() would go past {self._limit()} (have {self.rows_done + self._buffered} "
                                   f"rows, got {emb.shape[0]} more); restart the embedding loop at writer.rows_done")
        if not np.all(np.isfinite(emb.astype(np.float32, copy=False))):
            raise IndexFormatError(f"write() got non-finite embeddings in rows starting at "
                                   f"{self.rows_done + self._buffered}; check the encoder (NaN weights or overflow)")
        self._buffer.append(emb.astype(DTYPES[self.dtype]))
        self._buffered += emb.shape[0]
        self._flush()

    def _flush(self) -> None:
        while self._buffered > 0 and self._buffered >= self._own[self._shards_done]["rows"]:
            entry = self._own[self._shards_done]
            data = np.concatenate(self._buffer, axis=0) if len(self._buffer) > 1 else self._buffer[0]
            shard, rest = data[:entry["rows"]], data[entry["rows"]:]
            path = os.path.join(self.output_dir, entry["file"])
            corpus._atomic_save_npy(path, shard.view(_STORAGE_DTYPES[self.dtype]))
            self._shards_done += 1
            self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def finalize(self) -> str:
        """Marks this host's part complete; writes index.json if that completes the index. Returns the directory.

        With one host the index is then complete. With several, index.json appears when the last host to finish
        sees every host's progress file complete (shared filesystem); hosts that do not share one call
        `write_index_metadata()` after a barrier instead. `index_written` says whether this call wrote it.
        """
        self._flush()
        if self.rows_done != self.stop_row or self._buffered:
            raise IndexFormatError(f"finalize(): only {self.rows_done + self._buffered - self.start_row} of "
                                   f"{self.stop_row - self.start_row} rows were written; write the rest (from "
                                   "writer.rows_done) before finalize()")
        if self.num_hosts == 1:
            self.write_index_metadata()
        else:
            self.metadata["complete"] = True
            corpus._atomic_write_json(self._progress_path, self.metadata)
            if self.all_hosts_complete():
                self.write_index_metadata()
        return self.output_dir

    def all_hosts_complete(self) -> bool:
        """Whether every host's progress file in this directory says its part is complete (for this layout)."""
        for host in range(self.num_hosts):
            progress = _read_json(os.path.join(self.output_dir, host_progress_file(host, self.num_hosts)))
            if progress is None or not progress.get("complete"):
                return False
            self._check_resumable(progress, num_passages_known=True)
        return True

    def write_index_metadata(self) -> None:
        """Writes the complete index.json of the whole layout (call once every host's part is on disk)."""
        meta = {k: v for k, v in self.metadata.items() if k not in ("host_index", "host_rows")}
        meta.update(shards=self._layout, complete=True)
        old = _read_metadata(self.output_dir)
        if old is not None and old.get("complete"):
            meta["backends"] = old.get("backends", {})  # A rerun keeps the searchers built since.
        self.metadata = meta if self.num_hosts == 1 else self.metadata
        write_metadata(self.output_dir, meta)
        self.index_written = True


class Index:
    """A loaded index directory. Shard files are memory-mapped (read-only, stored dtype; bfloat16 as ml_dtypes)
    when first needed, so a host of a pod only ever opens the files holding its own rows."""

    def __init__(self, index_dir: str, metadata: dict[str, Any], passages: corpus.PassageStore):
        self.index_dir, self.metadata, self.passages = index_dir, metadata, passages
        self.shard_entries: list[dict[str, Any]] = metadata["shards"]
        self._starts = np.array([e["start"] for e in self.shard_entries] + [self.num_passages], np.int64)
        self._open: dict[int, np.ndarray] = {}

    @property
    def num_passages(self) -> int:
        return int(self.metadata["num_passages"])

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def dtype(self) -> np.dtype:
        """The dtype rows come back in (the stored one)."""
        return DTYPES[self.metadata["dtype"]]

    @property
    def encoder_id(self) -> str:
        return self.metadata["encoder_id"]

    def shard_path(self, i: int) -> str:
        return os.path.join(self.index_dir, self.shard_entries[i]["file"])

    def shard_problem(self, i: int) -> str | None:
        """Why shard i cannot be read as this index says (missing, wrong shape or dtype), or None if it can."""
        if i in self._open:
            return None
        entry, path = self.shard_entries[i], self.shard_path(i)
        if not os.path.exists(path):
            return f"shard {path} is missing"
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            return f"shard {path} cannot be read as .npy ({e})"
        want, storage = (entry["rows"], self.dim), _STORAGE_DTYPES[self.metadata["dtype"]]
        if arr.shape != want or arr.dtype != storage:
            return (f"shard {path} has shape {arr.shape} dtype {arr.dtype}, expected {want} {storage} "
                    f"({self.metadata['dim']}-d rows {entry['start']}..{entry['start'] + entry['rows'] - 1})")
        self._open[i] = arr.view(self.dtype)
        return None

    def shard(self, i: int) -> np.ndarray:
        """Shard i as a read-only memmap; raises IndexFormatError naming the file if it is missing or wrong."""
        problem = self.shard_problem(i)
        if problem is not None:
            raise IndexFormatError(f"{problem}; restore it (copy it from the host that built it) or rebuild the index")
        return self._open[i]

    @property
    def shards(self) -> list[np.ndarray]:
        """Every shard (opens them all)."""
        return [self.shard(i) for i in range(len(self.shard_entries))]

    def shards_for_rows(self, start: int, stop: int) -> list[int]:
        """Indices of the shard files holding rows [start, stop)."""
        if start >= stop:
            return []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left"))
        return list(range(first, last))

    def broken_shards(self, start: int, stop: int) -> list[tuple[int, str]]:
        """(shard index, problem) for each shard file holding rows [start, stop) that cannot be read as expected."""
        return [(i, p) for i in self.shards_for_rows(start, stop) if (p := self.shard_problem(i)) is not None]

    def check_rows(self, start: int, stop: int) -> list[str]:
        """Problems with the shard files holding rows [start, stop) (empty if all are readable as expected)."""
        return [p for _, p in self.broken_shards(start, stop)]

    def read_rows(self, start: int, stop: int, dtype=None) -> np.ndarray:
        """Rows [start, stop) of the N x D embeddings as one in-memory array (optionally cast to `dtype`)."""
        if not 0 <= start <= stop <= self.num_passages:
            raise IndexError(f"rows [{start}, {stop}) out of range for an index of {self.num_passages} passages")
        parts = []
        for i in self.shards_for_rows(start, stop):
            lo = max(start, int(self._starts[i])) - int(self._starts[i])
            hi = min(stop, int(self._starts[i + 1])) - int(self._starts[i])
            parts.append(self.shard(i)[lo:hi])
        out = np.concatenate(parts, axis=0) if parts else np.zeros((0, self.dim), self.dtype)
        return out if dtype is None else out.astype(dtype)

    def gather_rows(self, rows, dtype=np.float32) -> np.ndarray:
        """Embeddings of arbitrary `rows` (any shape of ints): rows.shape + (D,), cast to `dtype`."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_passages):
            raise IndexError(f"rows out of range for an index of {self.num_passages} passages")
        out = np.zeros((flat.size, self.dim), dtype)
        shard_of = np.searchsorted(self._starts, flat, side="right") - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            out[sel] = self.shard(int(i))[flat[sel] - self._starts[i]]
        return out.reshape(rows.shape + (self.dim,))

    def embeddings(self, dtype=None) -> np.ndarray:
        """The whole N x D matrix in memory (for exact search or building ScaNN on one host)."""
        return self.read_rows(0, self.num_passages, dtype)


def load_index(index_dir: str | os.PathLike, expected_encoder: str | None = None, expected_dim: int | None = None,
               passages_path: str | os.PathLike | None = None, *, check_shards: bool = True) -> Index:
    """Opens a complete index directory, refusing one built for another encoder/dim or with missing shards.

    passages_path: where the passages file lives now, if it moved since the index was built (its fingerprint
    must match the one recorded). check_shards: open and check every shard file now; pass False on a pod whose
    hosts each hold only their own shard files (the sharded loaders check each host's rows before using them).
    """
    index_dir = os.fspath(index_dir)
    where = os.path.join(index_dir, METADATA_FILE)
    meta = _read_metadata(index_dir)
    if meta is None:
        progress = sorted(n for n in os.listdir(index_dir) if n.startswith("index.host-")) \
            if os.path.isdir(index_dir) else []
        if progress:
            raise IndexFormatError(f"{where} not found, but {index_dir} holds a multi-host build in progress "
                                   f"({', '.join(progress)}); rerun build_index on every host to finish it")
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
    next_row = 0
    for entry in meta["shards"]:
        if entry["start"] != next_row or entry["rows"] <= 0:
            raise IndexFormatError(f"{where}: shard {entry['file']} starts at row {entry['start']} with "
                                   f"{entry['rows']} rows, expected to start at {next_row}; rebuild the index")
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
    index = Index(index_dir, meta, store)
    if check_shards:
        problems = index.check_rows(0, index.num_passages)
        if problems:
            raise IndexFormatError(f"{where}: {problems[0]}; restore it or rebuild the index")
    return index
