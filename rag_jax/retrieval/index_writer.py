"""Writing an index directory (layout and format: index_io.py): passage embeddings appended in row order into
whole shard files, resumable after an interruption, on one host or on several at once.

A build resumes only into a directory holding an index of the same layout and identity (index_io.IDENTITY_FIELDS),
never into someone else's non-empty directory, and stores finite vectors only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rag_jax import files
from rag_jax.retrieval import corpus, passage_store
from rag_jax.retrieval.index_io import (DTYPES, INDEX_FILE_PREFIXES, INDEX_VERSION, LAYOUT_FIELDS, METADATA_FILE,
                                        RECORDED_IDENTITY, STORAGE_DTYPES, IndexFormatError, host_progress_file,
                                        host_rows, read_json, shard_layout, write_metadata)


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
                 num_hosts: int = 1, devices_per_host: int = 1, identity: dict[str, Any] | None = None):
        """encoder_id: any string identifying the document encoder (name + checkpoint fingerprint); an index is
        only reused for the same one. num_passages: None takes the count from the passages file, otherwise it must
        agree. dtype: "float32", "float16" or "bfloat16" storage of the embeddings. host_index / num_hosts: this
        writer's part of a build on several hosts (see `host_rows`); devices_per_host: accelerators per host of the
        job that will load the index (it places the host boundaries; irrelevant with one host). identity: the
        RECORDED_IDENTITY fields of the vectors to write (how passages were tokenised and pooled)."""
        self.output_dir = os.fspath(output_dir)
        identity = dict(identity or {})
        if set(identity) - set(RECORDED_IDENTITY):
            raise IndexFormatError(f"identity fields {sorted(set(identity) - set(RECORDED_IDENTITY))} are not "
                                   f"among {RECORDED_IDENTITY}")
        if dtype not in DTYPES:
            raise IndexFormatError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if dim <= 0 or shard_size <= 0:
            raise IndexFormatError(f"dim ({dim}) and shard_size ({shard_size}) must be positive")
        if not 0 <= host_index < num_hosts or devices_per_host < 1:
            raise IndexFormatError(f"host_index={host_index} must be in [0, num_hosts={num_hosts}) and "
                                   f"devices_per_host={devices_per_host} positive")
        if not os.path.isfile(passages_path):
            raise IndexFormatError(f"{passages_path}: passages file not found")
        refuse_foreign_directory(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self.dim, self.shard_size, self.dtype = int(dim), int(shard_size), dtype
        self.host_index, self.num_hosts = int(host_index), int(num_hosts)
        self.metadata = {
            "version": INDEX_VERSION, "encoder_id": encoder_id, "dim": self.dim, "dtype": dtype,
            "num_passages": num_passages, "shard_size": self.shard_size, "num_hosts": self.num_hosts,
            "devices_per_host": int(devices_per_host) if num_hosts > 1 else 1,
            "passages_path": os.path.abspath(passages_path),
            "passages_fingerprint": corpus.file_fingerprint(passages_path),
            "complete": False, "shards": [], "backends": {}, **identity}
        # One host: index.json is also the progress record. Several: each host only ever writes its own file.
        self._progress_path = os.path.join(
            self.output_dir, METADATA_FILE if num_hosts == 1 else host_progress_file(host_index, num_hosts))
        # Check a previous run's metadata before (re)building the passage store, which would overwrite its own.
        old = read_json(self._progress_path)
        for previous in (old, read_json(os.path.join(self.output_dir, METADATA_FILE))):
            if previous is not None:
                self._check_resumable(previous, num_passages_known=num_passages is not None)
        self.passages = passage_store.PassageStore.build(passages_path, self.output_dir)
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
        files.write_json(self._progress_path, self.metadata)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.index_written = False  # Set by finalize() once index.json describes the whole, complete index.

    def _check_resumable(self, old: dict[str, Any], num_passages_known: bool) -> None:
        where = os.path.join(self.output_dir, METADATA_FILE)
        for field in RECORDED_IDENTITY:
            if field in self.metadata and field not in old:
                raise IndexFormatError(
                    f"{where}: this index was written before rag_jax recorded {field}, so its vectors cannot be "
                    f"matched to this run's {field}={self.metadata[field]!r}; build into a fresh output directory (or "
                    "delete this one)")
        fields = list(LAYOUT_FIELDS) + list(RECORDED_IDENTITY) + (["num_passages"] if num_passages_known else [])
        for field in fields:
            if old.get(field, LAYOUT_FIELDS.get(field)) != self.metadata.get(field, LAYOUT_FIELDS.get(field)):
                raise IndexFormatError(
                    f"{where}: this directory holds an index with {field}={old.get(field)!r}, but this run has "
                    f"{field}={self.metadata.get(field)!r}; use a fresh output directory (or delete this one) instead of "
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
            if arr.shape != want or arr.dtype != STORAGE_DTYPES[self.dtype]:
                raise IndexFormatError(f"{path}: shape {arr.shape} dtype {arr.dtype}, expected {want} "
                                       f"{STORAGE_DTYPES[self.dtype]}; delete the index directory and rebuild it")
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
        with np.errstate(over="ignore"):  # checked just below: float16 turns values beyond 65504 into inf
            stored = emb.astype(DTYPES[self.dtype])
        if not np.all(np.isfinite(stored)):
            raise IndexFormatError(f"write() got non-finite embeddings (as {self.dtype}) in rows starting at "
                                   f"{self.rows_done + self._buffered}; check the encoder (NaN weights or overflow), "
                                   "or store float32 (--dtype)")
        self._buffer.append(stored)
        self._buffered += emb.shape[0]
        self._flush()

    def _flush(self) -> None:
        while self._buffered > 0 and self._buffered >= self._own[self._shards_done]["rows"]:
            entry = self._own[self._shards_done]
            data = np.concatenate(self._buffer, axis=0) if len(self._buffer) > 1 else self._buffer[0]
            shard, rest = data[:entry["rows"]], data[entry["rows"]:]
            path = os.path.join(self.output_dir, entry["file"])
            files.save_npy(path, shard.view(STORAGE_DTYPES[self.dtype]))
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
            files.write_json(self._progress_path, self.metadata)
            if self.all_hosts_complete():
                self.write_index_metadata()
        return self.output_dir

    def all_hosts_complete(self) -> bool:
        """Whether every host's progress file in this directory says its part is complete (for this layout)."""
        for host in range(self.num_hosts):
            progress = read_json(os.path.join(self.output_dir, host_progress_file(host, self.num_hosts)))
            if progress is None or not progress.get("complete"):
                return False
            self._check_resumable(progress, num_passages_known=True)
        return True

    def write_index_metadata(self) -> None:
        """Writes the complete index.json of the whole layout (call once every host's part is on disk)."""
        meta = {k: v for k, v in self.metadata.items() if k not in ("host_index", "host_rows")}
        meta.update(shards=self._layout, complete=True)
        old = read_json(os.path.join(self.output_dir, METADATA_FILE))
        if old is not None and old.get("complete"):
            meta["backends"] = old.get("backends", {})  # A rerun keeps the searchers built since.
        self.metadata = meta if self.num_hosts == 1 else self.metadata
        write_metadata(self.output_dir, meta)
        self.index_written = True


def refuse_foreign_directory(output_dir: str) -> None:
    """An existing non-empty directory that holds no index is someone else's: writing an index there could
    overwrite their files."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise IndexFormatError(f"{output_dir} is a file; give a directory to write the index into")
    if os.path.isdir(output_dir):
        names = os.listdir(output_dir)
        if names and not any(n.startswith(INDEX_FILE_PREFIXES) for n in names):
            raise IndexFormatError(f"{output_dir} is not empty and holds no index (no {METADATA_FILE}); give a new or "
                                   "empty directory for the index")
