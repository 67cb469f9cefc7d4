"""What crosses hosts: loading the index sharded over a pod's devices, and ScaNN searchers merged across hosts.

On a pod every host reads only the index rows of its own devices; a host that cannot (a shard file missing or of
the wrong dimension) must not simply raise, or the other hosts would wait forever in the next collective. So
every host checks its own files first, then the hosts exchange a short verdict (`agree_or_raise`, one tiny
allgather) and all of them raise the same error, naming the failing host, file and remedy, or all go on.

With ScaNN each host builds (or loads) a searcher over its own rows; a search runs on every host with the same
queries, each host rescores its local top-k exactly, and the per-host lists are allgathered and merged
(`merge.merge_topk`), so every host gets the same global top-k.
"""

from __future__ import annotations

import os
import socket
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from rag_jax.retrieval import index_io, merge, scann_backend

_VERDICT_BYTES = 2048  # Room for one host's error message in the allgather (longer ones are cut).


def host_label(host_index: int | None = None, num_hosts: int | None = None) -> str:
    """'host 1 of 4 (hostname)' for this process (or the given place in a job)."""
    host_index = jax.process_index() if host_index is None else host_index
    num_hosts = jax.process_count() if num_hosts is None else num_hosts
    return f"host {host_index} of {num_hosts} ({socket.gethostname()})"


def agree(problem: str | None) -> list[str | None]:
    """Every host's problem (None: fine), in host order, on every host. A collective: all hosts must call it."""
    if jax.process_count() == 1:
        return [problem]
    verdict = np.zeros(_VERDICT_BYTES, np.uint8)
    if problem is not None:
        encoded = problem.encode("utf-8")[:_VERDICT_BYTES - 1]
        verdict[0] = 1
        verdict[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(verdict)).reshape(-1, _VERDICT_BYTES)
    return [bytes(v[1:]).rstrip(b"\0").decode("utf-8", "replace") if v[0] else None for v in everyone]


def agree_or_raise(problem: str | None, what: str) -> None:
    """Raises the same IndexFormatError on every host if any host has a problem (a collective)."""
    failed = [p for p in agree(problem) if p is not None]
    if failed:
        raise index_io.IndexFormatError(f"{what}: " + " | ".join(failed))


def _row_ranges(sharding: NamedSharding, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """The row ranges (merged) this process's devices hold of an array of `shape` laid out by `sharding`."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(index[0].indices(shape[0])[:2]
                              for index in sharding.addressable_devices_indices_map(shape).values()):
        if merged and start <= merged[-1][1]:  # Adjacent or replicated blocks: one range.
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def local_index_problem(index: index_io.Index, row_ranges: Sequence[tuple[int, int]], host_index: int | None = None,
                        num_hosts: int | None = None) -> str | None:
    """Why this host cannot read its rows of `index` (naming host, files and remedy), or None if it can."""
    broken: dict[int, str] = {}
    for start, stop in row_ranges:
        broken.update(index.broken_shards(min(start, index.num_passages), min(stop, index.num_passages)))
    if not broken:
        return None
    built_by = sorted({index.shard_entries[i].get("host", 0) for i in broken})
    num_built = index.metadata.get("num_hosts", 1)
    rows = ", ".join(f"[{a}, {min(b, index.num_passages)})" for a, b in row_ranges)
    who = ", ".join(map(str, built_by))
    rerun = (f"rerun the same build_index job on all {num_built} hosts (by hand: --host_index={who} "
             f"--num_hosts={num_built}); it resumes, so build host {who} re-embeds from its first missing shard on "
             "and the others have nothing left to do" if num_built > 1
             else "rerun the same build_index command; it resumes from the first missing shard on")
    return (f"{host_label(host_index, num_hosts)} needs rows {rows} of {index.index_dir}, but "
            f"{'; '.join(broken[i] for i in sorted(broken))}. Copy the file(s) into {index.index_dir} on this host "
            f"from where they were built, or delete them and {rerun}")


def device_put_rows(embeddings, sharding: NamedSharding, num_rows_padded: int, dtype=None) -> jax.Array:
    """The N x D embeddings as a global array of num_rows_padded rows laid out by `sharding` (rows past N zero).

    embeddings: a loaded index_io.Index (each host checks and reads only its devices' rows; every host raises
    the same error if any host cannot) or an N x D array (numpy, memmap) present on every host.
    """
    if isinstance(embeddings, index_io.Index):
        n, d, read, stored = embeddings.num_passages, embeddings.dim, embeddings.read_rows, embeddings.dtype
    elif getattr(embeddings, "ndim", None) == 2:
        n, d, stored = embeddings.shape[0], embeddings.shape[1], embeddings.dtype
        read = lambda a, b: np.asarray(embeddings[a:b])
    else:
        raise merge.SearchError(f"embeddings must be an N x D array or a loaded Index, got {type(embeddings)}")
    if num_rows_padded < n:
        raise merge.SearchError(f"num_rows_padded={num_rows_padded} is smaller than the {n} rows")
    shape = (num_rows_padded, d)
    if isinstance(embeddings, index_io.Index):
        agree_or_raise(local_index_problem(embeddings, _row_ranges(sharding, shape)),
                       f"cannot load the index {embeddings.index_dir} on every host")
    dtype = np.dtype(stored if dtype is None else dtype)

    def rows_for_device(index):
        start, stop, _ = index[0].indices(num_rows_padded)
        block = np.zeros((stop - start, d), dtype)
        real = max(0, min(stop, n) - start)
        if real:
            block[:real] = read(start, start + real)
        return block

    return jax.make_array_from_callback(shape, sharding, rows_for_device)


# ----------------------------------------------------------------------------------------------- ScaNN per host


def scann_host_rows(index: index_io.Index, host_index: int, num_hosts: int) -> tuple[int, int]:
    """The rows a host's ScaNN searcher covers: the rows it built if the index was built by as many hosts, else an
    even split."""
    if index.metadata.get("num_hosts", 1) == num_hosts:
        return index_io.host_rows(index.num_passages, num_hosts, host_index, index.metadata.get("devices_per_host", 1))
    return index_io.host_rows(index.num_passages, num_hosts, host_index)


def scann_host_dir(index: index_io.Index, host_index: int, num_hosts: int) -> str:
    return os.path.join(index.index_dir, scann_backend.SCANN_DIR, f"host-{host_index:05d}-of-{num_hosts:05d}")


class MultiHostScannSearcher:
    """ScaNN over the whole corpus of a multi-host job: each host searches its own rows, results are merged.

    search() is a collective: every host calls it with the same queries and gets the same (rows, scores).
    """

    def __init__(self, index: index_io.Index, local: scann_backend.ScannSearcher | None, host_index: int,
                 num_hosts: int):
        self.index, self.local = index, local
        self.num_passages, self.dim = index.num_passages, index.dim
        self.host_index, self.num_hosts = host_index, num_hosts

    @classmethod
    def load_or_build(cls, index: index_io.Index, config: scann_backend.ScannConfig | None = None, *,
                      save: bool = True, host_index: int | None = None,
                      num_hosts: int | None = None) -> MultiHostScannSearcher:
        """This host's searcher from `scann/host-H-of-N/` if saved there for its rows, else built (and saved).

        Every host checks it can read its rows first and all raise together if one cannot.
        """
        host_index = jax.process_index() if host_index is None else host_index
        num_hosts = jax.process_count() if num_hosts is None else num_hosts
        start, stop = scann_host_rows(index, host_index, num_hosts)
        problem = local_index_problem(index, [(start, stop)], host_index, num_hosts) if stop > start else None
        what = f"cannot build the per-host ScaNN searchers of {index.index_dir}"
        if num_hosts == jax.process_count():
            agree_or_raise(problem, what)
        elif problem is not None:  # Building one host's searcher outside a multi-host job: nobody to wait for.
            raise index_io.IndexFormatError(f"{what}: {problem}")
        if stop == start:  # A corpus smaller than the number of hosts leaves some hosts nothing to search.
            return cls(index, None, host_index, num_hosts)
        directory = scann_host_dir(index, host_index, num_hosts)
        local = None
        if os.path.exists(directory):
            local = scann_backend.ScannSearcher.load(directory)
            if (local.row_offset, local.num_passages, local.dim) != (start, stop - start, index.dim):
                local = None  # Built for another split of the corpus; rebuild below.
        if local is None:
            rows = index.read_rows(start, stop, np.float32)
            local = scann_backend.ScannSearcher.build(rows, config, row_offset=start)
            if save:
                local.save(directory)
        return cls(index, local, host_index, num_hosts)

    def _local_topk(self, q_QxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's best min(k, its rows), rescored exactly, padded to k with (-1, -inf)."""
        rows_QxK = np.full((q_QxD.shape[0], k), -1, np.int32)
        scores_QxK = np.full((q_QxD.shape[0], k), -np.inf, np.float32)
        if self.local is not None:
            k_local = min(k, self.local.num_passages)
            rows, _ = self.local.search(q_QxD, k_local)
            # Exact scores, so that lists from different hosts (and ScaNN's hashed scores) compare fairly.
            exact_QxK = np.einsum("qd,qkd->qk", q_QxD, self.index.gather_rows(rows, np.float32))
            order = np.argsort(-exact_QxK, axis=1, kind="stable")
            rows_QxK[:, :k_local] = np.take_along_axis(rows, order, axis=1)
            scores_QxK[:, :k_local] = np.take_along_axis(exact_QxK, order, axis=1)
        return rows_QxK, scores_QxK

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows_QxK int32 global rows, scores_QxK float32 exact dot products), best first, the same on every host."""
        merge.check_search_args(queries_QxD, k, self.num_passages, self.dim)
        if self.num_hosts != jax.process_count():
            raise merge.SearchError(f"this searcher covers host {self.host_index} of {self.num_hosts} but the job has "
                                    f"{jax.process_count()} processes; load it with load_or_build() in the job itself")
        q_QxD = np.ascontiguousarray(np.asarray(queries_QxD), dtype=np.float32)
        rows_QxK, scores_QxK = self._local_topk(q_QxD, int(k))
        if jax.process_count() == 1:
            return merge.merge_topk([(rows_QxK, scores_QxK)], [0], int(k))
        all_rows_HxQxK = np.asarray(multihost_utils.process_allgather(rows_QxK))
        all_scores_HxQxK = np.asarray(multihost_utils.process_allgather(scores_QxK))
        candidates = list(zip(all_rows_HxQxK, all_scores_HxQxK))
        return merge.merge_topk(candidates, [0] * len(candidates), int(k))  # Rows are already global.
