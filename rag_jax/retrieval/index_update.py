"""Adding passages to an index, and removing them, without rebuilding it (`build_index --add/--remove/--compact`).

Every update writes a new version directory, `index_dir/versions/v000001/`, that holds only what changed (the new
rows' embeddings and codes, the added passages file and its store, the list of removed rows) and an index.json
describing the whole index, whose shard paths point back at the older files (relative paths). It is written as
`versions/v000001.partial/`, renamed when whole, and only then does `index_dir/CURRENT` (replaced atomically) name
it: a reader loading the index (index_io.load_index follows CURRENT) sees the old version or the new one, never a
mix, and a reader that already loaded the old one keeps reading files that no update changes.

  add      embeds only the new passages (with the encoder, tokenizer and length the index records: its identity), in
           shards of shard_size rows, and encodes them with the index's own codebooks; a killed run resumes from its
           whole shards. Passage ids must be new.
  remove   masks rows at once (index.removed_rows; searchers never return them). Ids must be in the index.
  compact  writes a version with the removed rows dropped (rows renumbered, passages rewritten into one file, codes
           re-encoded with the same codebooks), so searches need no mask.
Rerunning an update that is already the current version does nothing. index.json's "update" records the version
number (part of index_io.identity, so a trained workdir records it), the rows the root directory's searchers
(ScaNN) cover, and the history of updates.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np

from rag_jax import files
from rag_jax.retrieval import codes as codes_lib
from rag_jax.retrieval import corpus, index_codes, index_io, passage_store

VERSIONS_DIR = "versions"
_REQUEST_FILE = "update.json"


def _version_dir(index_dir: str, version: int) -> str:
    return os.path.join(index_dir, VERSIONS_DIR, f"v{version:06d}")


def _rebased(path: str, old_dir: str, new_dir: str) -> str:
    """A path written relative to old_dir, rewritten relative to new_dir (absolute paths stay)."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(os.path.normpath(os.path.join(old_dir, path)), new_dir)


def _next_metadata(index: index_io.Index, new_dir: str, request: dict[str, Any]) -> dict[str, Any]:
    """The current version's metadata with every path made relative to `new_dir` and the update recorded."""
    meta = {k: v for k, v in index.metadata.items() if k != "backends"}
    old = index.index_dir
    meta["shards"] = [{**e, "file": _rebased(e["file"], old, new_dir)} for e in index.shard_entries]
    segments = meta.get("segments") or [{"passages_path": meta["passages_path"], "store_dir": "."}]
    meta["segments"] = [{**s, "passages_path": _rebased(s["passages_path"], old, new_dir),
                         "store_dir": _rebased(s["store_dir"], old, new_dir)} for s in segments]
    if meta.get("codes") and meta["codes"].get("codebooks"):
        meta["codes"] = {**meta["codes"], "codebooks": _rebased(meta["codes"]["codebooks"], old, new_dir)}
    if meta.get("removed"):
        meta["removed"] = {**meta["removed"], "file": _rebased(meta["removed"]["file"], old, new_dir)}
    previous = meta.get("update") or {"version": 0, "base_rows": index.num_passages, "history": []}
    meta["update"] = {"version": previous["version"] + 1, "base_rows": previous["base_rows"],
                      "history": previous["history"] + [request]}
    meta["backends"] = {}  # searchers built for the root's rows are found through update.base_rows
    return meta


class _Update:
    """One update's partial directory: created (or resumed when a killed run asked for the same), then published."""

    def __init__(self, index_dir: str, request: dict[str, Any]):
        self.index_dir = os.path.abspath(index_dir)
        self.index = index_io.load_index(self.index_dir)
        history = (self.index.metadata.get("update") or {}).get("history", [])
        self.done = bool(history) and history[-1] == request
        version = (self.index.metadata.get("update") or {}).get("version", 0) + 1
        self.final = _version_dir(self.index_dir, version)
        self.partial = self.final + ".partial"
        self.request = request
        if self.done:
            return
        for leftover in (self.final, self.partial):  # what a killed run of another request (or this one) left
            recorded = index_io.read_json(os.path.join(leftover, _REQUEST_FILE)) if os.path.isdir(leftover) else None
            if os.path.isdir(leftover) and recorded != request:
                shutil.rmtree(leftover)
        if os.path.isdir(self.final):  # whole, killed before CURRENT moved: publish it
            return
        os.makedirs(self.partial, exist_ok=True)
        files.write_json(os.path.join(self.partial, _REQUEST_FILE), request)

    def publish(self, meta: dict[str, Any]) -> index_io.Index:
        """index.json into the partial directory, the rename, then CURRENT: the update becomes visible at once."""
        if not os.path.isdir(self.final):
            meta["complete"] = True
            index_io.write_metadata(self.partial, meta)
            os.replace(self.partial, self.final)
        pointer = os.path.join(self.index_dir, index_io.CURRENT_FILE)
        with files.replaced_when_done(pointer) as tmp, open(tmp, "w") as f:
            f.write(os.path.relpath(self.final, self.index_dir) + "\n")
        return index_io.load_index(self.index_dir)


def _check_new_ids(index: index_io.Index, added_path: str) -> None:
    """Every record of the added file is valid (corpus.read_passages' checks) and its id new, in the file and the
    index; checked before anything is written, so a refused --add changes nothing."""
    seen = set()
    for row, passage in enumerate(corpus.read_passages(added_path), 1):
        if passage.id in seen:
            raise index_io.IndexFormatError(f"{added_path}: passage {row} repeats the id {passage.id!r}; ids must be "
                                            "unique")
        seen.add(passage.id)
        try:
            index.passages.row_for_id(passage.id)
        except corpus.UnknownPassageIdError:
            continue
        raise index_io.IndexFormatError(f"{added_path}: passage {row} has id {passage.id!r}, already in "
                                        f"{index.index_dir}; give added passages new ids (or --remove the old one)")


def add_passages(index_dir: str, added_path: str, embed_fn: Callable[[Sequence[corpus.Passage]], np.ndarray],
                 identity: dict[str, Any], shard_size: int | None = None) -> index_io.Index:
    """Appends the passages of `added_path`, embedded with `embed_fn` (rows (n, D)), as a new version of the index;
    `identity`: what embed_fn's encoder gives (index_io.IDENTITY_FIELDS), refused if the index records otherwise."""
    index = index_io.load_index(index_dir)
    mismatch = index_io.identity_mismatch(index.identity, identity)
    if mismatch:
        field, got, want = mismatch
        raise index_io.IndexFormatError(f"{index.index_dir}: {field}={got!r}, but the encoder given embeds with "
                                        f"{field}={want!r}; --add with the index's own document encoder and settings")
    ext = ".tsv" if corpus.corpus_format(added_path) == "tsv" else ".jsonl"
    request = {"add": corpus.file_fingerprint(added_path)}
    history = (index.metadata.get("update") or {}).get("history", [])
    if not (history and history[-1] == request):  # (a rerun of the last update: its ids are in the index)
        _check_new_ids(index, added_path)
    update = _Update(index_dir, request)
    if update.done:
        return update.index
    index = update.index
    name = "added_passages" + ext
    work = update.partial if os.path.isdir(update.partial) else update.final
    meta = _next_metadata(index, update.final, update.request)
    if work == update.partial:
        copy = os.path.join(work, name)
        if not os.path.exists(copy):
            with files.replaced_when_done(copy) as tmp:
                shutil.copyfile(added_path, tmp)
        added = passage_store.PassageStore.build(copy, work)
        meta["shards"] += _embed_shards(index, added, work, embed_fn, shard_size or int(index.metadata["shard_size"]))
        meta["segments"].append({"passages_path": name, "store_dir": ".",
                                 "fingerprint": added.metadata["fingerprint"]})
        meta["num_passages"] = index.num_passages + added.num_passages
    return update.publish(meta)


def _embed_shards(index: index_io.Index, added: passage_store.PassageStore, work: str, embed_fn, shard_size: int
                  ) -> list[dict[str, Any]]:
    """Embeds (and encodes) the added passages into shard files numbered after the index's; whole ones are kept."""
    spec = index_codes.spec_of(index.metadata)
    books = index_codes.load_codebooks(index)
    entries = []
    for j, first in enumerate(range(0, added.num_passages, shard_size)):
        rows = min(shard_size, added.num_passages - first)
        entry = {"file": index_io.shard_file(len(index.shard_entries) + j), "start": index.num_passages + first,
                 "rows": rows, "host": 0}
        path = os.path.join(work, entry["file"])
        storage = index_io.STORAGE_DTYPES[index.metadata["dtype"]]
        if not (os.path.exists(path) and np.load(path, mmap_mode="r").shape == (rows, index.dim)):
            vectors = np.asarray(embed_fn(list(added.iter_passages(first, first + rows))))
            stored = vectors.astype(index_io.DTYPES[index.metadata["dtype"]])
            if stored.shape != (rows, index.dim) or not np.isfinite(stored).all():
                raise index_io.IndexFormatError(f"the encoder gave {stored.shape} vectors (or non-finite ones) for "
                                                f"{rows} passages of {added.path}; expected ({rows}, {index.dim})")
            if spec is not None:  # codes first: a shard file on disk means its codes are there too
                codes, scale = codes_lib.encode(spec, stored.astype(np.float32), books)
                code_path, scale_path = index_codes.code_paths(path)
                if spec.kind == "int8":
                    files.save_npy(scale_path, scale)
                files.save_npy(code_path, codes)
            files.save_npy(path, stored.view(storage))
        entries.append(entry)
    return entries


def read_ids_file(path: str) -> list[str]:
    """Passage ids, one a line (blank lines and surrounding spaces ignored)."""
    if not os.path.isfile(path):
        raise index_io.IndexFormatError(f"{path}: no such ids file; give a file of passage ids, one a line")
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise index_io.IndexFormatError(f"{path}: no passage ids in the file; give one id a line")
    return ids


def remove_passages(index_dir: str, ids_path: str) -> index_io.Index:
    """Masks the passages whose ids `ids_path` lists as a new version (unknown ids: an error, nothing changed)."""
    ids = read_ids_file(ids_path)
    index = index_io.load_index(index_dir)
    rows = []
    for line, pid in enumerate(ids, 1):
        try:
            rows.append(index.passages.row_for_id(pid))
        except corpus.UnknownPassageIdError:
            raise index_io.IndexFormatError(f"{ids_path}:{line}: passage id {pid!r} is not in {index.index_dir}; "
                                            "remove only ids of the index (nothing was changed)") from None
    update = _Update(index_dir, {"remove": corpus.file_fingerprint(ids_path)})
    if update.done:
        return update.index
    meta = _next_metadata(update.index, update.final, update.request)
    if os.path.isdir(update.partial):
        removed = np.union1d(update.index.removed_rows, np.asarray(rows, np.int64))
        files.save_npy(os.path.join(update.partial, "removed.npy"), removed)
        meta["removed"] = {"file": "removed.npy", "count": int(len(removed))}
    return update.publish(meta)


def compact(index_dir: str) -> index_io.Index:
    """A version without the removed rows: kept rows renumbered, their passages written into one file, embeddings
    copied and codes re-encoded with the same codebooks. Searchers built for the old rows (ScaNN) no longer apply."""
    index = index_io.load_index(index_dir)
    removed = index.removed_rows
    if not len(removed):
        return index
    update = _Update(index_dir, {"compact": int(len(removed)), "from_version": index.metadata["update"]["version"]})
    if update.done:
        return update.index
    meta = _next_metadata(update.index, update.final, update.request)
    keep = np.setdiff1d(np.arange(index.num_passages), removed)
    if os.path.isdir(update.partial):
        path = os.path.join(update.partial, "passages.jsonl")
        live = np.ones(index.num_passages, bool)
        live[removed] = False
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row, passage in enumerate(index.passages.iter_passages()):
                if live[row]:
                    f.write(json.dumps({"id": passage.id, "title": passage.title, "text": passage.text}) + "\n")
        os.replace(path + ".tmp", path)
        store = passage_store.PassageStore.build(path, update.partial)
        shard_size = int(index.metadata["shard_size"])
        meta["shards"] = []
        for j, first in enumerate(range(0, len(keep), shard_size)):
            rows = keep[first:first + shard_size]
            entry = {"file": index_io.shard_file(j), "start": first, "rows": len(rows), "host": 0}
            vectors = index.gather_rows(rows, index.dtype)
            target = os.path.join(update.partial, entry["file"])
            files.save_npy(target, vectors.view(index_io.STORAGE_DTYPES[index.metadata["dtype"]]))
            meta["shards"].append(entry)
        meta.update(num_passages=int(len(keep)), passages_path="passages.jsonl", num_hosts=1, devices_per_host=1,
                    passages_fingerprint=store.metadata["fingerprint"],
                    segments=[{"passages_path": "passages.jsonl", "store_dir": "."}])
        meta.pop("removed", None)
        meta["update"]["base_rows"] = 0  # the root's searchers cover rows that no longer exist
        spec = index_codes.spec_of(meta)
        if spec is not None:
            meta["codes"] = {**meta["codes"], "complete": False}
            index_io.write_metadata(update.partial, meta)
            compacted = index_io.Index(update.partial, meta, store)
            for i in range(len(meta["shards"])):
                index_codes.write_shard_codes(compacted, i, spec, index_codes.load_codebooks(compacted))
            meta["codes"]["complete"] = True
    return update.publish(meta)
