"""Searching compressed indexes and updated ones.

CodeSearcher: the codes of every row on one device (padded to a capacity, codes.capacity, so that an update
swapped in does not recompile), a jitted scoring of the codes and top-L (exact top_k on CPU/GPU, approx_max_k on
TPU), then an exact re-rank of those L candidates with the full-precision vectors read from the memory-mapped shards:
the K returned are the exact top K of the L (retrieval.rerank_from_codes = L; 0 returns the code scores' top K).
make_sharded_code_topk is the same search over codes split along the corpus axes of a mesh (device mode).
MaskedSearcher puts a searcher of the whole index (exact, ScaNN) in front of the rows an update removed
(index_update.py): removed rows are never returned.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rag_jax.retrieval import codes as codes_lib
from rag_jax.retrieval import exact, index_codes, index_io, merge

QUERY_BLOCK = 512  # questions scored per jitted call (a Q x ROW_CHUNK block: 512 MB; few compilations)
ROW_CHUNK = 1 << 18  # rows scored at a time (a Q x ROW_CHUNK block, not Q x N: 21M rows would need 10 GB)


def padded_arrays(table: index_codes.CodeTable, removed_rows: np.ndarray, capacity: int) -> codes_lib.CodeArrays:
    """The index's codes as numpy CodeArrays of `capacity` rows: removed and padding rows get bias -inf."""
    n = table.index.num_passages
    codes, scale = table.read(0, n)
    bias = np.zeros(capacity, np.float32)
    bias[n:] = -np.inf
    bias[np.asarray(removed_rows, np.int64)] = -np.inf
    return codes_lib.CodeArrays(np.pad(codes, ((0, capacity - n), (0, 0))), np.pad(scale, (0, capacity - n)), bias)


def chunked_topk(kind: str, q_QxD, arrays: codes_lib.CodeArrays, codebooks, k: int, approximate: bool,
                 total: int) -> tuple[jax.Array, jax.Array]:
    """(code scores_QxK, rows_QxK int32) of the best k of `arrays`' rows, scored ROW_CHUNK rows at a time (each
    chunk's top k, then the top k of those) when the rows divide into such chunks, else all at once."""
    n = arrays.bias_N.shape[0]
    if n <= ROW_CHUNK or n % ROW_CHUNK:
        values, rows = exact._topk(codes_lib.scores(kind, q_QxD, arrays, codebooks), min(k, n), approximate, total)  # pylint: disable=protected-access
        return values, rows.astype(jnp.int32)
    chunks = jax.tree_util.tree_map(lambda x: x.reshape((n // ROW_CHUNK, ROW_CHUNK) + x.shape[1:]), arrays)

    def one(chunk_and_index):
        chunk, i = chunk_and_index
        values, rows = exact._topk(codes_lib.scores(kind, q_QxD, codes_lib.CodeArrays(*chunk), codebooks), k,  # pylint: disable=protected-access
                                   approximate, total)
        return values, rows.astype(jnp.int32) + i * ROW_CHUNK

    values_CxQxK, rows_CxQxK = jax.lax.map(one, (tuple(chunks), jnp.arange(n // ROW_CHUNK)))
    values_QxA = values_CxQxK.transpose(1, 0, 2).reshape(q_QxD.shape[0], -1)
    rows_QxA = rows_CxQxK.transpose(1, 0, 2).reshape(q_QxD.shape[0], -1)
    values, pos = jax.lax.top_k(values_QxA, k)
    return values, jnp.take_along_axis(rows_QxA, pos, axis=1)


def _search_block(kind: str, k: int, approximate: bool, total: int):
    def search(q_QxD, arrays, codebooks):
        values, rows = chunked_topk(kind, q_QxD, arrays, codebooks, k, approximate, total)
        return rows, values
    return jax.jit(search)


def rerank_exact(index: index_io.Index, q_QxD: np.ndarray, rows_QxL: np.ndarray, approx_QxL: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k among each question's L candidate rows (full-precision vectors from disk); candidates with
    an approximate score of -inf (masked rows, when fewer live rows than L exist) are never picked."""
    vectors = index.gather_rows(np.where(np.isfinite(approx_QxL), rows_QxL, 0), np.float32)
    exact_QxL = np.matmul(vectors, q_QxD[:, :, None])[..., 0]  # batched BLAS, not einsum's loop
    exact_QxL = np.where(np.isfinite(approx_QxL), exact_QxL, -np.inf)
    order = np.argsort(-exact_QxL, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(rows_QxL, order, axis=1).astype(np.int32),
            np.take_along_axis(exact_QxL, order, axis=1).astype(np.float32))


class CodeSearcher:
    """Search on an index's codes with an exact re-rank of the best `rerank_from_codes` candidates."""

    def __init__(self, index: index_io.Index, rerank_from_codes: int = 0, *, device: jax.Device | None = None,
                 approximate: bool | None = None):
        self.table = index_codes.CodeTable(index)
        self.kind, self.dim, self.rerank = self.table.spec.kind, index.dim, int(rerank_from_codes)
        if self.rerank < 0:
            raise merge.SearchError(f"rerank_from_codes={rerank_from_codes}: give 0 (no re-rank) or a number of "
                                    "candidates L >= K")
        self.capacity = codes_lib.capacity(index.num_passages)
        self._device = device
        self._approximate = jax.default_backend() == "tpu" if approximate is None else approximate
        self.codebooks = None if self.table.codebooks is None else jax.device_put(self.table.codebooks, device)
        self._fns: dict[int, Callable] = {}
        self._load(index)

    def _load(self, index: index_io.Index) -> None:
        self.index, self.num_passages = index, index.num_passages
        removed = index.removed_rows
        self.num_live = index.num_passages - len(removed)
        self.arrays = jax.device_put(padded_arrays(self.table, removed, self.capacity), self._device)

    def swap_index(self, index: index_io.Index) -> None:
        """Searches `index` (an update or refresh of this one: same kind of codes, dimension and codebooks, at most
        `capacity` rows) from now on without recompiling; SearchError otherwise (build a new searcher)."""
        table = index_codes.CodeTable(index)
        same_books = (self.table.codebooks is None) == (table.codebooks is None) and (
            table.codebooks is None or np.array_equal(self.table.codebooks, table.codebooks))
        if table.spec != self.table.spec or index.dim != self.dim or not same_books or \
                index.num_passages > self.capacity:
            raise merge.SearchError(
                f"swap_index: {index.index_dir} holds {index.num_passages} x {index.dim} {table.spec} codes, this "
                f"searcher was compiled for up to {self.capacity} x {self.dim} {self.table.spec} codes with its own "
                "codebooks; build a new searcher for it (its search compiles anew)")
        self.table = table
        self._load(index)

    def search_fn(self, k: int) -> Callable:
        if k not in self._fns:
            self._fns[k] = _search_block(self.kind, k, self._approximate, self.num_passages)
        return self._fns[k]

    def candidates(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows_QxK, code scores_QxK) of the best k rows by their codes, in blocks of QUERY_BLOCK questions."""
        q = np.asarray(queries_QxD, np.float32)
        fn = self.search_fn(k)
        rows, scores = [], []
        for start in range(0, len(q), QUERY_BLOCK):
            block = q[start:start + QUERY_BLOCK]
            rows_padded = min(QUERY_BLOCK, 1 << (len(block) - 1).bit_length())  # few shapes: few compilations
            padded = np.pad(block, ((0, rows_padded - len(block)), (0, 0)))
            r, s = fn(padded, self.arrays, self.codebooks)
            rows.append(np.asarray(r)[:len(block)])
            scores.append(np.asarray(s)[:len(block)])
        return np.concatenate(rows), np.concatenate(scores)

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows_QxK int32, scores_QxK float32), best first: exact scores after a re-rank, else code scores."""
        merge.check_search_args(queries_QxD, k, self.num_live, self.dim)
        q = np.asarray(queries_QxD, np.float32)
        if not self.rerank:
            return self.candidates(q, int(k))
        width = min(max(int(k), self.rerank), self.num_passages)
        rows, approx = self.candidates(q, width)
        return rerank_exact(self.index, q, rows, approx, int(k))


class MaskedSearcher:
    """A searcher over every row of an updated index, less the rows it removed: asks `base` for k plus as many
    rows as were removed (at most), drops the removed ones. Removing many rows makes that wide: compact the index
    (build_index --compact) to search it at the plain width again."""

    def __init__(self, base: merge.Searcher, index: index_io.Index):
        self.base, self.index, self.dim = base, index, index.dim
        self.num_passages = index.num_passages
        self.removed = np.asarray(index.removed_rows, np.int64)
        self.num_live = self.num_passages - len(self.removed)

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        merge.check_search_args(queries_QxD, k, self.num_live, self.dim)
        width = min(self.base.num_passages, int(k) + len(self.removed))
        rows, scores = self.base.search(queries_QxD, width)
        scores = np.where(np.isin(rows, self.removed), -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(rows, order, axis=1).astype(np.int32),
                np.take_along_axis(scores, order, axis=1).astype(np.float32))


class AppendedSearcher:
    """A searcher built for the first rows of an index (ScaNN over the rows before an --add) joined with exact
    search over the rows appended since: the update needs no new tree."""

    def __init__(self, base: merge.Searcher, index: index_io.Index):
        self.base, self.index, self.dim = base, index, index.dim
        self.num_passages = index.num_passages
        self.appended = exact.ExactSearcher(index.read_rows(base.num_passages, index.num_passages, np.float32),
                                            prescreen=False)

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        merge.check_search_args(queries_QxD, k, self.num_passages, self.dim)
        q = np.asarray(queries_QxD, np.float32)
        parts = [self.base.search(q, min(int(k), self.base.num_passages)),
                 self.appended.search(q, min(int(k), self.appended.num_passages))]
        # Exact scores for both lists, so that ScaNN's hashed scores compare fairly with the appended rows'.
        rows0 = parts[0][0]
        parts[0] = (rows0, np.einsum("qd,qkd->qk", q, self.index.gather_rows(rows0, np.float32)))
        return merge.merge_topk(parts, [0, self.base.num_passages], int(k))


# ------------------------------------------------------------------------------------------------ device mode


def make_sharded_code_topk(mesh: Mesh, kind: str, k: int, *, corpus_axes: str | Sequence[str] = "corpus",
                           query_axes: str | Sequence[str] | None = None, approximate: bool | None = None
                           ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jittable fn(q_QxD, arrays: CodeArrays laid out P(corpus_axes) along rows, codebooks replicated or None)
    -> (rows_QxK int32, code scores_QxK float32): each shard scores its codes and keeps its top k, then the shards'
    candidates are merged as exact.make_sharded_topk does. Masked rows (bias -inf) are never returned while k live
    rows exist; the number of rows is not compiled in, so updates within the capacity reuse the executable."""
    corpus_axes = (corpus_axes,) if isinstance(corpus_axes, str) else tuple(corpus_axes)
    q_spec, row_spec = P(query_axes, None), P(corpus_axes)
    approximate = jax.default_backend() == "tpu" if approximate is None else approximate

    def local_then_global(q_QxD, arrays, codebooks):
        n_local = arrays.bias_N.shape[0]
        offset = jax.lax.axis_index(corpus_axes) * n_local
        total = n_local * math.prod(mesh.shape[a] for a in corpus_axes)
        scores_Qxk, local_Qxk = chunked_topk(kind, q_QxD, arrays, codebooks, min(k, n_local), approximate, total)
        rows_QxC = jax.lax.all_gather((local_Qxk + offset).astype(jnp.int32), corpus_axes, axis=1, tiled=True)
        cand_QxC = jax.lax.all_gather(scores_Qxk, corpus_axes, axis=1, tiled=True)
        scores_QxK, pos_QxK = jax.lax.top_k(cand_QxC, k)
        return jnp.take_along_axis(rows_QxC, pos_QxK, axis=1), scores_QxK

    arrays_spec = codes_lib.CodeArrays(P(corpus_axes, None), row_spec, row_spec)
    books_spec = None if kind == "int8" else P()
    search = jax.shard_map(local_then_global, mesh=mesh, in_specs=(q_spec, arrays_spec, books_spec),
                           out_specs=(q_spec, q_spec), check_vma=False)
    return search


def put_rows(array: np.ndarray, sharding: NamedSharding, rows: int | None = None) -> jax.Array:
    """A host array (present on every host) padded with zero rows to `rows`, laid out by `sharding` (each device
    takes its own block)."""
    rows = array.shape[0] if rows is None else rows
    padded = np.pad(array, ((0, rows - array.shape[0]),) + ((0, 0),) * (array.ndim - 1))
    return jax.make_array_from_callback(padded.shape, sharding, lambda index: padded[index])


def replace_code_arrays(index: index_io.Index, corpus: dict) -> None:
    """Puts `index`'s codes into a device corpus's "codes"/"code_scale"/"code_bias" arrays in place: the same
    capacity and shardings, so the compiled step is reused (an index refresh or update within the capacity)."""
    capacity = corpus["code_bias"].shape[0]
    if index.num_passages > capacity:
        raise merge.SearchError(f"{index.index_dir} holds {index.num_passages} passages, more than the device "
                                f"corpus' capacity {capacity}; restart the run to compile for the larger index")
    host = padded_arrays(index_codes.CodeTable(index), index.removed_rows, capacity)
    for key, value in (("codes", host.codes), ("code_scale", host.scale_N), ("code_bias", host.bias_N)):
        corpus[key] = put_rows(np.asarray(value), corpus[key].sharding)


def sharded_code_arrays(index: index_io.Index, mesh: Mesh, corpus_axes: str | Sequence[str] = "corpus",
                        capacity: int | None = None) -> tuple[codes_lib.CodeArrays, jax.Array | None]:
    """(CodeArrays on the mesh, rows split over corpus_axes, capacity rows; codebooks replicated or None) for
    make_sharded_code_topk: the device corpus of a compressed index."""
    corpus_axes = (corpus_axes,) if isinstance(corpus_axes, str) else tuple(corpus_axes)
    shards = math.prod(mesh.shape[a] for a in corpus_axes)
    capacity = capacity or codes_lib.capacity(index.num_passages, shards)
    table = index_codes.CodeTable(index)
    host = padded_arrays(table, index.removed_rows, capacity)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    arrays = codes_lib.CodeArrays(place(host.codes, P(corpus_axes, None)), place(host.scale_N, P(corpus_axes)),
                                  place(host.bias_N, P(corpus_axes)))
    books = None if table.codebooks is None else place(table.codebooks, P())
    return arrays, books
