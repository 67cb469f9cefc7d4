"""Exact maximum inner product search on accelerators: one device, or the corpus sharded over a mesh axis.

Scores are q . e in float32 (16-bit embeddings are multiplied as 16-bit with float32 accumulation, which is
what the MXU does well). The sharded search computes each device's local top-k over its slice of the corpus
and takes the global top-k of the gathered candidates, so it returns the same rows as the one-device search
(up to ties) while every device only holds N / num_shards rows. On TPU the local step uses
`jax.lax.approx_max_k` (the TPU-optimised partial reduction, recall-targeted against the global N).

The jitted searches take the embeddings as an argument, never as a constant, so `swap_index` can put another
index of the same N x D and dtype in place between evaluations (the paper's 2016 vs 2018 Wikipedia) without a
recompilation. On several hosts, loading goes through `multihost.device_put_rows`: each host reads only its
devices' rows and all hosts fail together if one cannot.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rag_jax.retrieval import index_io, merge, multihost
from rag_jax.retrieval import prescreen as _prescreen

Precision = jax.lax.Precision


def _scores_QxN(q_QxD: jax.Array, emb_NxD: jax.Array, precision) -> jax.Array:
    if jnp.dtype(emb_NxD.dtype).itemsize == 2:  # Keep the big operand 16-bit; do not upcast the corpus.
        q_QxD = q_QxD.astype(emb_NxD.dtype)
    return jnp.einsum("qd,nd->qn", q_QxD, emb_NxD, precision=precision, preferred_element_type=jnp.float32)


# Columns per group in grouped_top_k's pre-selection.
_GROUP = 64


def grouped_top_k(scores_QxN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k(scores, k) over many columns, through a pre-selection.

    A column among the k best lies in a group of _GROUP consecutive columns whose maximum is among the k largest
    group maxima, so top_k over the columns of those k groups (and of the last N % _GROUP columns) is exact. The
    group maxima are one streaming pass over the scores, cheaper than top_k's own pass over every column: on CPU,
    1,024 queries over 1M rows go from 108 to ~135 queries/s, the matmul alone being ~138. Equal scores may come
    out in another order than lax.top_k's (lowest column first)."""
    q, n = scores_QxN.shape
    n_grouped = n - n % _GROUP
    if n_grouped // _GROUP <= k:
        return jax.lax.top_k(scores_QxN, k)
    grouped_QxGxW = scores_QxN[:, :n_grouped].reshape(q, n_grouped // _GROUP, _GROUP)
    _, groups_QxK = jax.lax.top_k(grouped_QxGxW.max(axis=-1), k)
    cand_QxC = jnp.take_along_axis(grouped_QxGxW, groups_QxK[:, :, None], axis=1).reshape(q, k * _GROUP)
    cols_QxC = (groups_QxK[:, :, None] * _GROUP + jnp.arange(_GROUP)).reshape(q, k * _GROUP)
    if n_grouped < n:
        cand_QxC = jnp.concatenate([cand_QxC, scores_QxN[:, n_grouped:]], axis=1)
        tail = jnp.broadcast_to(jnp.arange(n_grouped, n), (q, n - n_grouped))
        cols_QxC = jnp.concatenate([cols_QxC, tail.astype(cols_QxC.dtype)], axis=1)
    values_QxK, pos_QxK = jax.lax.top_k(cand_QxC, k)
    return values_QxK, jnp.take_along_axis(cols_QxC, pos_QxK, axis=1)


def _topk(scores_QxN: jax.Array, k: int, approximate: bool, total_size: int) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k best columns; approximate uses TPU's approx_max_k, recall-targeted at the
    `total_size` rows this reduction is one part of."""
    if approximate:
        return jax.lax.approx_max_k(scores_QxN, k, recall_target=0.95, reduction_input_size_override=total_size)
    return grouped_top_k(scores_QxN, k)


def exact_topk(q_QxD: jax.Array, emb_NxD: jax.Array, k: int, *, precision=Precision.HIGHEST,
               num_valid: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Jittable exact MIPS: (rows_QxK int32, scores_QxK float32), best first. k must be static.

    num_valid: rows >= num_valid are padding and never returned (lets callers pad N to a friendly size).
    """
    scores_QxN = _scores_QxN(q_QxD, emb_NxD, precision)
    if num_valid is not None and num_valid < emb_NxD.shape[0]:
        valid_N = jnp.arange(emb_NxD.shape[0]) < num_valid
        scores_QxN = jnp.where(valid_N[None, :], scores_QxN, -jnp.inf)
    scores_QxK, rows_QxK = grouped_top_k(scores_QxN, k)
    return rows_QxK.astype(jnp.int32), scores_QxK


def _axes_tuple(axes: str | Sequence[str]) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def make_sharded_topk(mesh: Mesh, k: int, num_valid: int, *, corpus_axes: str | Sequence[str] = "corpus",
                      query_axes: str | Sequence[str] | None = None, approximate: bool | None = None,
                      precision=Precision.HIGHEST) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Builds a jittable fn(q_QxD, emb_NxD) -> (rows_QxK int32, scores_QxK float32) for a corpus-sharded index.

    emb_NxD is laid out P(corpus_axes, None) over `mesh` with N a multiple of the number of corpus shards; rows
    >= num_valid are padding. Queries are split over `query_axes` (None: every corpus shard sees all of them).
    approximate: None picks approx_max_k on TPU and exact top_k elsewhere.
    """
    corpus_axes = _axes_tuple(corpus_axes)
    q_spec = P(query_axes, None)
    if approximate is None:
        approximate = jax.default_backend() == "tpu"

    def local_then_global_topk(q_QxD, emb_nxD):
        n_local = emb_nxD.shape[0]
        offset = jax.lax.axis_index(corpus_axes) * n_local
        rows_n = offset + jnp.arange(n_local, dtype=jnp.int32)
        scores_Qxn = _scores_QxN(q_QxD, emb_nxD, precision)
        scores_Qxn = jnp.where((rows_n < num_valid)[None, :], scores_Qxn, -jnp.inf)
        scores_Qxk, local_Qxk = _topk(scores_Qxn, min(k, n_local), approximate, num_valid)
        # Every shard's candidates side by side, Q x (num_shards * k_local) in shard order, then the global top-k:
        # k * num_shards values cross the interconnect per query instead of N scores.
        cand_rows_QxC = jax.lax.all_gather((local_Qxk + offset).astype(jnp.int32), corpus_axes, axis=1, tiled=True)
        cand_scores_QxC = jax.lax.all_gather(scores_Qxk, corpus_axes, axis=1, tiled=True)
        scores_QxK, pos_QxK = jax.lax.top_k(cand_scores_QxC, k)
        return jnp.take_along_axis(cand_rows_QxC, pos_QxK, axis=1), scores_QxK

    # check_vma=False: after the all_gather every corpus shard holds the same merged result, which the
    # varying-manual-axes check cannot infer through all_gather + top_k.
    search = jax.shard_map(local_then_global_topk, mesh=mesh, in_specs=(q_spec, P(corpus_axes, None)),
                           out_specs=(q_spec, q_spec), check_vma=False)

    # Explicit mesh axes take jax.reshard; Auto ones (a GSPMD training step) take a sharding constraint.
    explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    place = jax.reshard if explicit else jax.lax.with_sharding_constraint

    def sharded_topk(q_QxD, emb_NxD):
        q_QxD = place(q_QxD, NamedSharding(mesh, q_spec))
        emb_NxD = place(emb_NxD, NamedSharding(mesh, P(corpus_axes, None)))
        return search(q_QxD, emb_NxD)

    return sharded_topk


def _as_rows_reader(embeddings) -> tuple[int, int, np.dtype, Callable[[int, int], np.ndarray]]:
    """(N, D, dtype, read(start, stop)) for an ndarray/memmap/jax array or a loaded index_io.Index."""
    if isinstance(embeddings, index_io.Index):
        return embeddings.num_passages, embeddings.dim, embeddings.dtype, embeddings.read_rows
    if getattr(embeddings, "ndim", None) != 2:
        raise merge.SearchError(f"embeddings must be an N x D array or a loaded Index, got {type(embeddings)}")
    return (embeddings.shape[0], embeddings.shape[1], np.dtype(embeddings.dtype),
            lambda a, b: np.asarray(embeddings[a:b]))


def _check_swap(old_NxD: jax.Array, num_passages: int, dim: int, new, n: int, d: int, dtype: np.dtype) -> None:
    if (n, d, np.dtype(dtype)) != (num_passages, dim, np.dtype(old_NxD.dtype)):
        where = new.index_dir if isinstance(new, index_io.Index) else "the new embeddings"
        raise merge.SearchError(
            f"swap_index: {where} holds {n} x {d} {np.dtype(dtype)} embeddings, but this searcher's search was "
            f"compiled for {num_passages} x {dim} {np.dtype(old_NxD.dtype)}; build a new searcher for it (its search "
            "compiles anew), or rebuild the index with the same number of passages, dimension and dtype")


def _to_numpy(x: jax.Array) -> np.ndarray:
    """A search result as numpy on every host (gathered when it is split over hosts' devices)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ExactSearcher:
    """Exact MIPS with the whole N x D matrix on one device (fine up to a few million rows)."""

    def __init__(self, embeddings, *, device: jax.Device | None = None, dtype=None, precision=Precision.HIGHEST,
                 prescreen: bool | None = None):  # fmt: skip
        """embeddings: N x D array (numpy, memmap, jax) or a loaded Index; dtype casts it on the way in.
        prescreen: search float32 embeddings through a certified bfloat16 pre-selection (rag_jax.retrieval.
        prescreen: the same rows, ~2.7x faster on a CPU with bfloat16 units, for N x D x 2 more bytes); None:
        float32 embeddings on a CPU device whose CPU has bfloat16 units."""
        n, self.dim, _, read = _as_rows_reader(embeddings)
        self.num_passages = n
        self.index = embeddings if isinstance(embeddings, index_io.Index) else None
        self._device, self._dtype = device, dtype
        emb = read(0, n)
        self.embeddings_NxD = jax.device_put(emb if dtype is None else emb.astype(dtype), device)
        self._topk = jax.jit(exact_topk, static_argnames=("k", "precision", "num_valid"))
        self._precision = precision
        if prescreen is None:
            on_cpu = next(iter(self.embeddings_NxD.devices())).platform == "cpu"
            prescreen = on_cpu and self.embeddings_NxD.dtype == jnp.float32 and _prescreen.cpu_has_bfloat16_units()
        if prescreen and self.embeddings_NxD.dtype != jnp.float32:
            raise merge.SearchError(f"prescreen needs float32 embeddings, got {self.embeddings_NxD.dtype}")
        prescreen = prescreen and _prescreen.applies(n, 1)  # with too few rows no k leaves a group out: no tables
        self._prescreen_tables = _prescreen.tables(self.embeddings_NxD) if prescreen else None
        self._prescreened = jax.jit(_prescreen.prescreened_topk, static_argnames=("k", "precision"))

    def swap_index(self, embeddings) -> None:
        """Searches `embeddings` (an array or a loaded Index, e.g. another Wikipedia dump) from now on, without
        recompiling: N, D and the dtype must be those of the current ones (raises SearchError otherwise)."""
        n, d, stored, read = _as_rows_reader(embeddings)
        _check_swap(self.embeddings_NxD, self.num_passages, self.dim, embeddings, n, d,
                    stored if self._dtype is None else self._dtype)
        emb = read(0, n)
        self.embeddings_NxD = jax.device_put(emb if self._dtype is None else emb.astype(self._dtype), self._device)
        self.index = embeddings if isinstance(embeddings, index_io.Index) else None
        if self._prescreen_tables is not None:
            self._prescreen_tables = _prescreen.tables(self.embeddings_NxD)

    def search_device(self, queries_QxD, k: int) -> tuple[jax.Array, jax.Array]:
        """Like search() but leaves the results on device as jax arrays."""
        merge.check_search_args(queries_QxD, k, self.num_passages, self.dim)
        q_QxD = jnp.asarray(queries_QxD, jnp.float32)
        plain = functools.partial(self._topk, emb_NxD=self.embeddings_NxD, k=int(k), precision=self._precision)
        if self._prescreen_tables is None or not _prescreen.applies(self.num_passages, int(k)):
            return plain(q_QxD)
        rows_QxK, scores_QxK, certified_Q = self._prescreened(q_QxD, self.embeddings_NxD, self._prescreen_tables,
                                                              k=int(k), precision=self._precision)  # fmt: skip
        missed = np.flatnonzero(~np.asarray(certified_Q))
        if missed.size:  # searched again the plain way, in power-of-two batches (few compilations)
            padded = np.resize(missed, 1 << int(missed.size - 1).bit_length())
            again_rows, again_scores = plain(q_QxD[padded])
            rows_QxK = rows_QxK.at[missed].set(again_rows[: missed.size])
            scores_QxK = scores_QxK.at[missed].set(again_scores[: missed.size])
        return rows_QxK, scores_QxK

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows_QxK int32, scores_QxK float32) as numpy, best first."""
        rows, scores = self.search_device(queries_QxD, k)
        return np.asarray(rows, np.int32), np.asarray(scores, np.float32)


class ShardedExactSearcher:
    """Exact MIPS with the corpus split over the `corpus_axes` of a mesh (rows padded to a multiple of shards).

    Each process only reads the rows of its own devices (via jax.make_array_from_callback), so on a TPU pod the
    index never has to fit in one host's memory; with a loaded Index every host first checks its own shard files
    and all hosts raise the same error if one of them cannot read its rows. The jitted search takes the embeddings
    as an argument, so `swap_index` replaces them without recompiling. With several processes, every process
    calls search() with the same queries.
    """

    def __init__(self, embeddings, mesh: Mesh, *, corpus_axes: str | Sequence[str] = "corpus",
                 query_axes: str | Sequence[str] | None = None, approximate: bool | None = None, dtype=None,
                 precision=Precision.HIGHEST):
        """embeddings: N x D array or a loaded Index. corpus_axes: mesh axis name(s) the rows are split over.
        query_axes: mesh axis name(s) to split queries over (None: replicate). approximate: see make_sharded_topk."""
        n, self.dim, _, _ = _as_rows_reader(embeddings)
        self.num_passages, self.mesh = n, mesh
        self._corpus_axes, self._query_axes = _axes_tuple(corpus_axes), query_axes
        for axis in self._corpus_axes:
            if axis not in mesh.shape:
                raise merge.SearchError(f"corpus axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
        num_shards = math.prod(mesh.shape[a] for a in self._corpus_axes)
        self._num_rows_padded = -(-n // num_shards) * num_shards
        self._sharding = NamedSharding(mesh, P(self._corpus_axes, None))
        self._dtype = dtype
        self.embeddings_NxD = multihost.device_put_rows(embeddings, self._sharding, self._num_rows_padded, dtype)
        self.index = embeddings if isinstance(embeddings, index_io.Index) else None
        self._approximate, self._precision = approximate, precision
        self._fns: dict[int, Callable] = {}

    def swap_index(self, embeddings) -> None:
        """Searches `embeddings` (an array or a loaded Index, e.g. another Wikipedia dump) from now on, without
        recompiling: N, D and the dtype must be those of the current ones (raises SearchError otherwise). A
        collective with several processes, like loading."""
        n, d, stored, _ = _as_rows_reader(embeddings)
        _check_swap(self.embeddings_NxD, self.num_passages, self.dim, embeddings, n, d,
                    stored if self._dtype is None else self._dtype)
        self.embeddings_NxD = multihost.device_put_rows(embeddings, self._sharding, self._num_rows_padded, self._dtype)
        self.index = embeddings if isinstance(embeddings, index_io.Index) else None

    def search_fn(self, k: int) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """The jitted fn(q_QxD, emb_NxD) -> (rows_QxK, scores_QxK) used for this k (compiled once per k)."""
        k = int(k)
        if k not in self._fns:
            self._fns[k] = jax.jit(make_sharded_topk(
                self.mesh, k, self.num_passages, corpus_axes=self._corpus_axes, query_axes=self._query_axes,
                approximate=self._approximate, precision=self._precision))
        return self._fns[k]

    def search_device(self, queries_QxD, k: int) -> tuple[jax.Array, jax.Array]:
        """Like search() but leaves the results on device (replicated over the corpus axes)."""
        merge.check_search_args(queries_QxD, k, self.num_passages, self.dim)
        queries = jax.device_put(np.asarray(queries_QxD, np.float32),
                                 NamedSharding(self.mesh, P(self._query_axes, None)))
        return self.search_fn(k)(queries, self.embeddings_NxD)

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows_QxK int32, scores_QxK float32) as numpy, best first (the same on every process)."""
        rows, scores = self.search_device(queries_QxD, k)
        return _to_numpy(rows).astype(np.int32), _to_numpy(scores).astype(np.float32)
