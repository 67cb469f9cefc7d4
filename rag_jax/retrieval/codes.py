"""Compressed passage vectors ("codes") and jitted search on them: per-row scaled int8, and product quantisation.

  int8   each row e is stored as round(e / s) in int8 with its own scale s = max|e| / 127 (D + 4 bytes a row);
         q.e is approximated by s (q . codes), a bfloat16 matmul (int8 values are exact in bfloat16) in float32.
  pq:M   the D dimensions are cut into M sub-vectors of D/M; each is replaced by the index (one byte) of the nearest
         of 256 centroids of its sub-space (M bytes a row). The codebooks (M x 256 x D/M) are trained by k-means in
         JAX on a sample of rows whose size and seed the index records. q.e is approximated by asymmetric
         distances: per question a lookup table T[m, j] = q_m . c_mj (M x 256), and the score of a row is the sum
         of its M table entries (the question itself is not quantised).

Scores on codes only pick candidates: searchers re-rank the best L of them with the full-precision vectors kept on
disk (code_search.py), so the K returned are the exact top K among those L. The arrays a kind needs per row are
CodeArrays (what the devices hold in device mode); `bias_N` is 0 for a live row and -inf for a removed or padding
one, an argument rather than a compiled constant so that updates do not recompile the search.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.retrieval.code_spec import CodesError, CodesSpec, parse_spec  # pylint: disable=unused-import (re-exported)

NUM_CENTROIDS = 256  # one byte per sub-vector
KMEANS_ITERATIONS = 20
DEFAULT_SAMPLE_SIZE = 16_384  # 64 rows per centroid
_ENCODE_CHUNK = 32_768  # rows encoded per jitted call (bounds the rows x 256 distance block)


class CodeArrays(NamedTuple):
    """The per-row arrays one kind of codes is searched with (rows may be padded past the real ones)."""

    codes: jax.Array  # int8 N x D (int8) or uint8 N x M (pq)
    scale_N: jax.Array  # float32 per-row scale (int8); zeros of shape (N,) for pq
    bias_N: jax.Array  # float32: 0 for a live row, -inf for a removed or padding row


# ---------------------------------------------------------------------------------------------------- int8


def int8_encode(x_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 N x D, scale float32 N): x ~ codes * scale, |error| <= scale / 2 per component."""
    x = np.asarray(x_NxD, np.float32)
    scale = np.abs(x).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8), scale


def int8_decode(codes_NxD, scale_N) -> jax.Array:
    return codes_NxD.astype(jnp.float32) * scale_N[:, None]


def int8_scores(q_QxD: jax.Array, codes_NxD: jax.Array, scale_N: jax.Array) -> jax.Array:
    """s (q . codes), float32 Q x N, from a bfloat16 matmul (the codes are exact in bfloat16; the question is
    rounded to it: ~2^-9 relative, below the codes' own error)."""
    dots_QxN = jnp.einsum("qd,nd->qn", q_QxD.astype(jnp.bfloat16), codes_NxD.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    return dots_QxN * scale_N[None, :]


# ---------------------------------------------------------------------------------------------------- pq


def _subvectors(x_NxD: jax.Array, m: int) -> jax.Array:
    """N x D -> M x N x D/M."""
    n, d = x_NxD.shape
    return x_NxD.reshape(n, m, d // m).transpose(1, 0, 2)


def _nearest(x_NxS: jax.Array, centroids_CxS: jax.Array) -> jax.Array:
    """Index of the nearest centroid (squared Euclidean) of every row."""
    dist_NxC = (-2.0 * jnp.einsum("ns,cs->nc", x_NxS, centroids_CxS, precision=jax.lax.Precision.HIGHEST)
                + jnp.sum(centroids_CxS**2, axis=1)[None, :])
    return jnp.argmin(dist_NxC, axis=1)


def _kmeans(x_NxS: jax.Array, init_CxS: jax.Array, iterations: int) -> jax.Array:
    """Lloyd's k-means from `init`; a centroid left without rows keeps its place. Sums and counts per centroid are
    one-hot matmuls (XLA:CPU runs a scatter-add of the rows serially, ~20x slower)."""

    def step(_, centroids_CxS):
        onehot_NxC = jax.nn.one_hot(_nearest(x_NxS, centroids_CxS), centroids_CxS.shape[0], dtype=x_NxS.dtype)
        sums_CxS = jnp.einsum("nc,ns->cs", onehot_NxC, x_NxS, precision=jax.lax.Precision.HIGHEST)
        counts_C = onehot_NxC.sum(axis=0)
        return jnp.where(counts_C[:, None] > 0, sums_CxS / jnp.maximum(counts_C, 1)[:, None], centroids_CxS)

    return jax.lax.fori_loop(0, iterations, step, init_CxS)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _train_all(subs_MxNxS: jax.Array, picks_C: jax.Array, iterations: int) -> jax.Array:
    """k-means in every sub-space, one after another inside one compiled call (one S x 256 block at a time)."""
    return jax.lax.map(lambda x_NxS: _kmeans(x_NxS, x_NxS[picks_C], iterations), subs_MxNxS)


def train_pq(sample_SxD: np.ndarray, m: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Codebooks float32 M x 256 x D/M: k-means (initialised on 256 distinct sample rows drawn with `seed`) in every
    sub-space."""
    sample = np.asarray(sample_SxD, np.float32)
    s, d = sample.shape
    CodesSpec("pq", m).check_dim(d)
    if s < NUM_CENTROIDS:
        raise CodesError(f"pq codebooks need at least {NUM_CENTROIDS} sample rows (one per centroid), got {s}; use "
                         "--codes=int8 for so small an index")
    picks = np.random.default_rng(seed).choice(s, NUM_CENTROIDS, replace=False)
    return np.asarray(_train_all(_subvectors(jnp.asarray(sample), m), jnp.asarray(picks), iterations), np.float32)


@jax.jit
def _pq_encode_chunk(x_NxD: jax.Array, codebooks_MxCxS: jax.Array) -> jax.Array:
    subs = _subvectors(x_NxD, codebooks_MxCxS.shape[0])
    return jax.lax.map(lambda a: _nearest(*a), (subs, codebooks_MxCxS)).T.astype(jnp.uint8)


def pq_encode(x_NxD: np.ndarray, codebooks_MxCxS: np.ndarray) -> np.ndarray:
    """uint8 N x M: each sub-vector's nearest centroid (rows in fixed-size chunks: one compilation)."""
    x = np.asarray(x_NxD, np.float32)
    out = np.empty((x.shape[0], codebooks_MxCxS.shape[0]), np.uint8)
    books = jnp.asarray(codebooks_MxCxS)
    for start in range(0, x.shape[0], _ENCODE_CHUNK):
        chunk = x[start:start + _ENCODE_CHUNK]
        padded = np.pad(chunk, ((0, _ENCODE_CHUNK - len(chunk)), (0, 0))) if x.shape[0] > _ENCODE_CHUNK else chunk
        out[start:start + len(chunk)] = np.asarray(_pq_encode_chunk(padded, books))[:len(chunk)]
    return out


def pq_decode(codes_NxM, codebooks_MxCxS) -> jax.Array:
    """The reconstruction N x D of every row (its centroids side by side)."""
    m = codebooks_MxCxS.shape[0]
    parts = [jnp.asarray(codebooks_MxCxS)[i][codes_NxM[:, i].astype(jnp.int32)] for i in range(m)]
    return jnp.concatenate(parts, axis=1)


def pq_tables(q_QxD: jax.Array, codebooks_MxCxS: jax.Array) -> jax.Array:
    """Per-question lookup tables Q x M x 256: T[q, m, j] = q_m . c_mj."""
    subs_MxQxS = _subvectors(jnp.asarray(q_QxD, jnp.float32), codebooks_MxCxS.shape[0])
    return jnp.einsum("mqs,mcs->qmc", subs_MxQxS, jnp.asarray(codebooks_MxCxS), precision=jax.lax.Precision.HIGHEST)


def pq_scores(tables_QxMxC: jax.Array, codes_NxM: jax.Array) -> jax.Array:
    """Asymmetric scores Q x N: the sum over sub-spaces of each row's table entries (one gather per sub-space)."""
    tables_MxQxC, codes_MxN = jnp.asarray(tables_QxMxC).transpose(1, 0, 2), jnp.asarray(codes_NxM).T

    def add(acc_QxN, sub):
        table_QxC, codes_N = sub
        return acc_QxN + jnp.take(table_QxC, codes_N.astype(jnp.int32), axis=1), None

    acc, _ = jax.lax.scan(add, jnp.zeros((tables_MxQxC.shape[1], codes_MxN.shape[1]), jnp.float32),
                          (tables_MxQxC, codes_MxN))
    return acc


# ---------------------------------------------------------------------------------------------------- both


def scores(kind: str, q_QxD: jax.Array, arrays: CodeArrays, codebooks=None) -> jax.Array:
    """Approximate q . e over the rows of `arrays` (Q x N float32), -inf on masked rows."""
    if kind == "int8":
        raw = int8_scores(q_QxD, arrays.codes, arrays.scale_N)
    else:
        raw = pq_scores(pq_tables(q_QxD, codebooks), arrays.codes)
    return raw + arrays.bias_N[None, :]


def decode(kind: str, arrays: CodeArrays, codebooks=None) -> jax.Array:
    """The vectors the codes stand for, float32 N x D (what device mode scores retrieved passages with)."""
    return int8_decode(arrays.codes, arrays.scale_N) if kind == "int8" else pq_decode(arrays.codes, codebooks)


def decode_rows(kind: str, codes_XxC: jax.Array, scale_X: jax.Array, codebooks=None) -> jax.Array:
    """decode() for rows of any leading shape X (e.g. the B x K retrieved in device mode): X x D float32."""
    if kind == "int8":
        return codes_XxC.astype(jnp.float32) * scale_X[..., None]
    parts = [codebooks[i][codes_XxC[..., i].astype(jnp.int32)] for i in range(codebooks.shape[0])]
    return jnp.concatenate(parts, axis=-1)


def encode(spec: CodesSpec, x_NxD: np.ndarray, codebooks=None) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale_N) of rows; scale is all ones for pq (unused)."""
    if spec.kind == "int8":
        return int8_encode(x_NxD)
    return pq_encode(x_NxD, codebooks), np.ones(len(x_NxD), np.float32)


def capacity(num_rows: int, multiple: int = 1) -> int:
    """Rows to allocate for `num_rows` so that updates fit without a new shape: rounded up to a step of 1/8 of the
    power of two below (at most 12.5% padding; at least 1,024 rows), then to a multiple of `multiple` (shards)."""
    step = max(1024, 1 << max(0, int(num_rows).bit_length() - 4))
    rows = -(-max(int(num_rows), 1) // step) * step
    return -(-rows // multiple) * multiple
