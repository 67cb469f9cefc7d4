"""The index directory: passage embeddings in resumable shards, plus metadata tying them to an encoder and corpus;
its layout and format, and reading it (`load_index`). Writing it: index_writer.py.

Layout of `index_dir/`:
  index.json              metadata: the identity (encoder_id, pooling, normalize, tokenizer_id, max_length, dtype),
                          dim, num_passages, shard_size, num_hosts, shards (file, first row, rows, building host),
                          passages file (path, relative to index_dir if not absolute, and fingerprint), complete
                          flag, backends (e.g. ScaNN searchers' parameters)
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
the hosts share a filesystem, or by each host after a barrier (`IndexWriter.write_index_metadata`).

Every file is written to a temporary name and renamed, so a killed embedding job leaves only whole shards and
`index_writer.IndexWriter` resumes after the last one (per host).

The identity of an index (IDENTITY_FIELDS) is everything besides the passages that its vectors depend on: the
encoder (weights and config, pooling and normalisation included, as `encoder_id`), the tokenizer, the maximum
length and the stored dtype. A build resumes only into an index of the same identity, and a model that knows the
identity of the index it was trained with refuses another (`check_identity`). Indexes written before rag_jax
recorded pooling, normalize, max_length and tokenizer_id lack them: loading treats them as unknown (not checked),
and resuming such an index is refused, since its vectors cannot be matched to this run's settings (rebuild it).
Non-finite vectors are refused when written and when read, so none reaches a search.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from rag_jax import files
from rag_jax.retrieval import corpus, passage_segments, passage_store

INDEX_VERSION = 1
METADATA_FILE = "index.json"
# An updated index (index_update.py): this file in the index directory names the version directory to read.
CURRENT_FILE = "CURRENT"
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# How each dtype is stored in .npy (bfloat16 has no .npy type code, so its bits go in as uint16).
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                   "bfloat16": np.dtype(np.uint16)}
# Fields that must agree between runs resuming one directory (and between the hosts of one build), with the
# value an index written before multi-host building implies.
LAYOUT_FIELDS = {"version": None, "encoder_id": None, "dim": None, "dtype": None, "shard_size": None,
                  "passages_fingerprint": None, "num_hosts": 1, "devices_per_host": 1}
# The identity fields recorded since issue 17 (see the module docstring); an older index lacks them.
RECORDED_IDENTITY = ("pooling", "normalize", "max_length", "tokenizer_id")
IDENTITY_FIELDS = ("encoder_id", *RECORDED_IDENTITY, "dtype")
# What a directory that build_index may write into can hold besides nothing: the files of an index.
INDEX_FILE_PREFIXES = (METADATA_FILE, "index.host-", "passage_store.json")


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


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{path}: not valid JSON ({e}); delete the index directory and rebuild it") from None


def current_dir(index_dir: str) -> str:
    """The directory holding the index.json to read: the version CURRENT names after an update, else index_dir."""
    pointer = os.path.join(index_dir, CURRENT_FILE)
    if not os.path.exists(pointer):
        return index_dir
    with open(pointer) as f:
        return os.path.join(index_dir, f.read().strip())


def read_metadata(index_dir: str) -> dict[str, Any] | None:
    """The metadata of the index's current version (the directory's own index.json unless updated since)."""
    return read_json(os.path.join(current_dir(index_dir), METADATA_FILE))


def identity(metadata: dict[str, Any]) -> dict[str, Any]:
    """The identity fields an index's metadata records (an older index records fewer), plus, for the record (not
    compared by identity_mismatch: the vectors are the same), its codes and the update version."""
    found = {field: metadata[field] for field in IDENTITY_FIELDS if field in metadata}
    if metadata.get("codes"):
        found["codes"] = {k: metadata["codes"].get(k) for k in ("spec", "sample_size", "seed", "codebooks_sha256")}
    if metadata.get("update"):
        found["index_version"] = metadata["update"]["version"]
    return found


def identity_mismatch(recorded: dict[str, Any], expected: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(field, recorded value, expected value) of the first identity field both record with different values."""
    for field in IDENTITY_FIELDS:
        if field in expected and field in recorded and expected[field] != recorded[field]:
            return field, recorded[field], expected[field]
    return None


def check_identity(index: "Index", expected: dict[str, Any], source: str) -> None:
    """Refuses `index` if it differs from the `expected` identity (that of the index a model was trained with, as
    `source` says) in a field both record."""
    mismatch = identity_mismatch(index.identity, expected)
    if mismatch:
        field, got, want = mismatch
        raise IndexFormatError(
            f"{os.path.join(index.index_dir, METADATA_FILE)}: {field}={got!r}, but {source} was trained with an index "
            f"of {field}={want!r} (other document vectors); use that index, or build one with the same document "
            "encoder, tokenizer, --max_length and --dtype")


def write_metadata(index_dir: str, metadata: dict[str, Any]) -> None:
    """Atomically replaces index.json (also used by backends to record themselves under "backends")."""
    files.write_json(os.path.join(index_dir, METADATA_FILE), metadata)


class Index:
    """A loaded index directory. Shard files are memory-mapped (read-only, stored dtype; bfloat16 as ml_dtypes)
    when first needed, so a host of a pod only ever opens the files holding its own rows."""

    def __init__(self, index_dir: str, metadata: dict[str, Any], passages: passage_store.PassageStore):
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

    @property
    def identity(self) -> dict[str, Any]:
        """What the vectors depend on besides the passages (IDENTITY_FIELDS; fewer for an older index)."""
        return identity(self.metadata)

    def _finite(self, i: int, rows: np.ndarray, first: int) -> np.ndarray:
        """`rows` of shard i (starting at row `first` of the index), refused if a value is NaN or inf: a damaged
        file, since the writer stores finite vectors only."""
        bad = ~np.isfinite(rows).all(axis=-1)
        if bad.any():
            row = first + int(np.argmax(bad))
            raise IndexFormatError(
                f"{self.shard_path(i)}: row {row} (passage {self.passages[row].id}) holds non-finite values; the file "
                f"is damaged: delete it and rerun build_index on {self.index_dir} to embed its rows again")
        return rows

    def shard_path(self, i: int) -> str:
        return os.path.normpath(os.path.join(self.index_dir, self.shard_entries[i]["file"]))

    @property
    def removed_rows(self) -> np.ndarray:
        """Sorted int64 rows an update removed (build_index --remove): never to be returned by a search."""
        record = self.metadata.get("removed")
        if not record:
            return np.zeros(0, np.int64)
        if not hasattr(self, "_removed"):
            self._removed = np.load(os.path.join(self.index_dir, record["file"])).astype(np.int64)
        return self._removed

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
        want, storage = (entry["rows"], self.dim), STORAGE_DTYPES[self.metadata["dtype"]]
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
            parts.append(self._finite(i, self.shard(i)[lo:hi], int(self._starts[i]) + lo))
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
            local = flat[sel] - self._starts[i]
            rows_found = self.shard(int(i))[local]
            bad = ~np.isfinite(rows_found).all(axis=-1)
            if bad.any():  # the same message as a read of that row
                first = int(flat[sel][np.argmax(bad)])
                self._finite(int(i), rows_found[bad][:1], first)
            out[sel] = rows_found
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
    index_dir = current_dir(os.fspath(index_dir))
    where = os.path.join(index_dir, METADATA_FILE)
    meta = read_metadata(index_dir)
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
    store = _passage_store(index_dir, meta, where, passages_path)
    if "segments" not in meta and store.metadata["fingerprint"] != meta["passages_fingerprint"] or \
            store.num_passages != meta["num_passages"]:
        raise IndexFormatError(f"{where}: the passage store in {index_dir} ({store.num_passages} passages) does not "
                               f"match num_passages={meta['num_passages']}/passages_fingerprint; rebuild the index")
    index = Index(index_dir, meta, store)
    if check_shards:
        problems = index.check_rows(0, index.num_passages)
        if problems:
            raise IndexFormatError(f"{where}: {problems[0]}; restore it or rebuild the index")
    return index


def _passage_store(index_dir: str, meta: dict[str, Any], where: str, passages_path=None):
    """The index's passages: one file's store, or (after --add) one store per segment read as one."""
    segments = meta.get("segments") or [{"passages_path": meta["passages_path"], "store_dir": "."}]
    stores = []
    for i, segment in enumerate(segments):
        path = os.path.join(index_dir, segment["passages_path"]) if passages_path is None or i else \
            os.fspath(passages_path)
        try:
            stores.append(passage_store.PassageStore(path, os.path.normpath(os.path.join(index_dir, segment["store_dir"]))))
        except corpus.CorpusError as e:
            raise IndexFormatError(f"{where}: passages file: {e}; pass passages_path= if the file moved") from None
    return stores[0] if len(stores) == 1 else passage_segments.SegmentedStore(stores)
