"""Codes in an index directory: written beside the full-precision shards (`build_index --codes=int8|pq:M`), read
back for searching (code_search.py) and for the device corpus.

Files, one set per embeddings shard (the same rows), each written to a temporary name and renamed:
  codes-00000.npy         int8 N_s x D (int8) or uint8 N_s x M (pq)
  code_scales-00000.npy   float32 N_s (int8 only)
  pq_codebooks.npy        float32 M x 256 x D/M (pq only), trained once, reused by every update and refresh
index.json records them under "codes": {"spec", "sample_size", "seed", "iterations", "codebooks" (path relative to
the directory of that index.json), "codebooks_sha256", "complete"}; the spec, sample, seed and codebook hash are part
of the index identity (index_io.identity) and an update keeps them (index_update.py). A killed run leaves whole
files only and a rerun encodes the shards still missing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from rag_jax import files
from rag_jax.retrieval import codes as codes_lib
from rag_jax.retrieval import index_io

CODEBOOKS_FILE = "pq_codebooks.npy"


def code_paths(shard_path: str) -> tuple[str, str]:
    """(codes file, scales file) beside an embeddings shard file."""
    folder, name = os.path.split(shard_path)
    suffix = name[len("embeddings-"):]
    return os.path.join(folder, "codes-" + suffix), os.path.join(folder, "code_scales-" + suffix)


def spec_of(metadata: dict[str, Any]) -> codes_lib.CodesSpec | None:
    record = metadata.get("codes")
    return codes_lib.parse_spec(record["spec"], "index.json codes.spec") if record else None


def codes_identity(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What the codes of an index depend on besides its vectors (None: no codes)."""
    record = metadata.get("codes")
    if not record:
        return None
    return {k: record.get(k) for k in ("spec", "sample_size", "seed", "iterations", "codebooks_sha256")}


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _sample_rows(num_rows: int, sample_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, min(num_rows, sample_size), replace=False))


def codebooks_path(index: index_io.Index) -> str:
    return os.path.normpath(os.path.join(index.index_dir, index.metadata["codes"]["codebooks"]))


def load_codebooks(index: index_io.Index) -> np.ndarray | None:
    """The pq codebooks of an index (checked against the hash index.json records), None for int8 / no codes."""
    spec = spec_of(index.metadata)
    if spec is None or spec.kind != "pq":
        return None
    path = codebooks_path(index)
    if not os.path.exists(path):
        raise index_io.IndexFormatError(f"{path}: the pq codebooks are missing; restore the file or rerun build_index "
                                        f"--codes={spec} on a copy of the index without codes")
    books = np.load(path)
    if _sha(books) != index.metadata["codes"]["codebooks_sha256"]:
        raise index_io.IndexFormatError(f"{path}: differs from the codebooks index.json records (sha256); restore the "
                                        "file: codes encoded with other codebooks cannot be searched with these")
    return books


def _check_same(index: index_io.Index, spec: codes_lib.CodesSpec, sample_size: int, seed: int) -> None:
    record = index.metadata["codes"]
    asked = {"spec": str(spec), "sample_size": sample_size, "seed": seed}
    for field, value in asked.items():
        if record.get(field) != value:
            raise index_io.IndexFormatError(
                f"{os.path.join(index.index_dir, index_io.METADATA_FILE)}: holds codes with {field}={record.get(field)!r}"
                f", this run asks for {field}={value!r}; rerun with the recorded settings, or build into a new --output")


def write_codes(index: index_io.Index, spec: codes_lib.CodesSpec, *, sample_size: int = codes_lib.DEFAULT_SAMPLE_SIZE,
                seed: int = 0, codebooks: np.ndarray | None = None) -> index_io.Index:
    """Adds codes to a complete index (resuming a killed run), records them in index.json, returns the index.

    codebooks: pq codebooks to encode with instead of training them (an index refresh or update keeps the index's
    own, so codes stay comparable); the recorded sample_size/seed are then those the codebooks were trained with.
    """
    spec.check_dim(index.dim)
    if "codes" in index.metadata:
        _check_same(index, spec, sample_size, seed)
        record = dict(index.metadata["codes"])
        codebooks = load_codebooks(index)
    else:
        record = {"spec": str(spec), "sample_size": sample_size, "seed": seed,
                  "iterations": codes_lib.KMEANS_ITERATIONS, "complete": False, "codebooks": None,
                  "codebooks_sha256": None}
        if spec.kind == "pq":
            if codebooks is None:
                sample = index.gather_rows(_sample_rows(index.num_passages, sample_size, seed))
                codebooks = codes_lib.train_pq(sample, spec.m, seed)
            path = os.path.join(index.index_dir, CODEBOOKS_FILE)
            files.save_npy(path, codebooks.astype(np.float32))
            record.update(codebooks=CODEBOOKS_FILE, codebooks_sha256=_sha(codebooks.astype(np.float32)))
        index.metadata["codes"] = record
        index_io.write_metadata(index.index_dir, index.metadata)
    for i, entry in enumerate(index.shard_entries):
        write_shard_codes(index, i, spec, codebooks)
    index.metadata["codes"] = {**index.metadata["codes"], "complete": True}
    index_io.write_metadata(index.index_dir, index.metadata)
    return index


def _shard_codes_ok(path: str, scale_path: str, rows: int, spec: codes_lib.CodesSpec, dim: int) -> bool:
    if not os.path.exists(path) or (spec.kind == "int8" and not os.path.exists(scale_path)):
        return False
    arr = np.load(path, mmap_mode="r")
    width, dtype = (dim, np.int8) if spec.kind == "int8" else (spec.m, np.uint8)
    return arr.shape == (rows, width) and arr.dtype == dtype


def write_shard_codes(index: index_io.Index, i: int, spec: codes_lib.CodesSpec, codebooks) -> None:
    """Encodes shard i of `index` into its code files unless whole ones are there."""
    entry = index.shard_entries[i]
    path, scale_path = code_paths(index.shard_path(i))
    if _shard_codes_ok(path, scale_path, entry["rows"], spec, index.dim):
        return
    rows = index.read_rows(entry["start"], entry["start"] + entry["rows"], np.float32)
    codes, scale = codes_lib.encode(spec, rows, codebooks)
    if spec.kind == "int8":
        files.save_npy(scale_path, scale)
    files.save_npy(path, codes)


class CodeTable:
    """The codes of a loaded index (memory-mapped shard files), read by row ranges like Index.read_rows."""

    def __init__(self, index: index_io.Index):
        record = index.metadata.get("codes")
        if not record or not record.get("complete"):
            raise index_io.IndexFormatError(
                f"{os.path.join(index.index_dir, index_io.METADATA_FILE)}: no complete codes; run build_index "
                f"--output={index.index_dir} --codes=int8|pq:M to add them (a killed run resumes)")
        self.index, self.spec = index, spec_of(index.metadata)
        self.codebooks = load_codebooks(index)
        self.width = index.dim if self.spec.kind == "int8" else self.spec.m

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self.index.shard_entries[i]
        path, scale_path = code_paths(self.index.shard_path(i))
        if not _shard_codes_ok(path, scale_path, entry["rows"], self.spec, self.index.dim):
            raise index_io.IndexFormatError(f"{path}: missing or not {entry['rows']} x {self.width} codes; rerun "
                                            f"build_index --output={self.index.index_dir} --codes={self.spec}")
        codes = np.load(path, mmap_mode="r")
        scale = np.load(scale_path, mmap_mode="r") if self.spec.kind == "int8" else np.ones(entry["rows"], np.float32)
        return codes, scale

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scale_N) of rows [start, stop)."""
        parts = []
        for i in self.index.shards_for_rows(start, stop):
            first = self.index.shard_entries[i]["start"]
            codes, scale = self._shard(i)
            lo, hi = max(start, first) - first, min(stop, first + len(codes)) - first
            parts.append((codes[lo:hi], scale[lo:hi]))
        if not parts:
            return np.zeros((0, self.width), np.int8 if self.spec.kind == "int8" else np.uint8), np.zeros(0, np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.float32)

    def bytes_per_row(self) -> int:
        return self.spec.bytes_per_row(self.index.dim)
