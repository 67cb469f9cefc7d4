"""Exact float32 MIPS through a certified bfloat16 pre-selection.

On CPUs with bfloat16 matrix units (AVX512-BF16, AMX), XLA multiplies bfloat16 about 3x as fast as float32, and
the float32 matmul over the whole corpus is what exact search costs. So: score every row in bfloat16, add a
proven bound on the error, keep the C groups of rows and then the C rows with the largest upper bounds, and score
those C exactly in float32. The answer is the float32 top-k whenever the largest upper bound left out is below the
k-th exact score: every row left out then scores below the k-th. A query for which that does not hold is reported
uncertified, and the caller searches it again the plain way, so the result is always exact (up to the order of
float32 near-ties, which a different summation order may swap). On 1M x 768 float32 rows, 1,024 queries: 2.7x
the plain search, every query certified (BENCHMARKS.md).

The bound, for a query q and a row e with bfloat16 roundings q', e' (rounding errors exact in float32):
    |q.e - q'.e'| <= |q| |e - e'| + |q - q'| |e'|                       (Cauchy-Schwarz on q.(e-e') + (q-q').e')
plus float32 accumulation, at most D u |q'| |e'| for the bfloat16 product and D u |q| |e| for the exact
rescoring it is compared with (u = 2^-24). Flushed subnormals and the bound's own rounding are covered by a
relative safety factor and a tiny absolute term.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32_UNIT_ROUNDOFF = 2.0**-24
_SAFETY = 1.0 + 1e-3  # covers the float32 rounding of the norms and of the bound itself (~D u relative)
_ABSOLUTE_SLACK = 1e-30  # covers subnormal products flushed to zero (each below 2^-126 |x|)
# Groups, and rows, kept beyond k. Larger: fewer uncertified queries, more rows gathered per query.
EXTRA_CANDIDATES = 64
_GROUP = 64  # rows per group; groups are pre-selected by an upper bound on their best row


class Tables(NamedTuple):
    """What the pre-selection needs besides the float32 rows: their bfloat16 rounding, padded with zero rows to
    whole groups (N x D x 2 bytes), and per row and per group the norms its error bound is made of."""

    rows_NxD: jax.Array  # bfloat16 rounding e' of the rows, then zero rows up to a multiple of _GROUP
    rounded_norm_N: jax.Array  # |e'|
    residual_norm_N: jax.Array  # |e - e'|
    rounded_norm_G: jax.Array  # the largest |e'| of each group
    residual_norm_G: jax.Array  # the largest |e - e'| of each group


@jax.jit
def tables(emb_NxD: jax.Array) -> Tables:
    pad = -emb_NxD.shape[0] % _GROUP
    rounded_NxD = emb_NxD.astype(jnp.bfloat16)
    wide_NxD = rounded_NxD.astype(jnp.float32)  # fused into the norms, never a second float32 corpus
    rounded_norm_N = jnp.linalg.norm(wide_NxD, axis=1)
    residual_norm_N = jnp.linalg.norm(emb_NxD - wide_NxD, axis=1)
    group_max = lambda x_N: jnp.pad(x_N, (0, pad)).reshape(-1, _GROUP).max(axis=1)
    return Tables(jnp.pad(rounded_NxD, ((0, pad), (0, 0))), rounded_norm_N, residual_norm_N,
                  group_max(rounded_norm_N), group_max(residual_norm_N))  # fmt: skip


@functools.cache
def cpu_has_bfloat16_units() -> bool:
    """Whether this host's CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); elsewhere XLA
    emulates bfloat16 and the pre-selection would be slower than plain float32 search."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def applies(num_rows: int, k: int) -> bool:
    """Whether there are groups to leave out (else the pre-selection only adds work)."""
    return -(-num_rows // _GROUP) > num_candidates(k)


def num_candidates(k: int) -> int:
    """Rows rescored in float32 per query (and groups pre-selected)."""
    return k + max(k, EXTRA_CANDIDATES)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k kept whole: XLA:CPU runs a top_k as its fast TopK call only while every use of the result
    is a slice from 0 to k; slicing the k-th value out, or the indices to fewer, turns it into a full sort of
    the row (a 2.5x slower search). The barrier keeps later slices from merging into it."""
    return jax.lax.optimization_barrier(jax.lax.top_k(x, k))


class _QueryTerms(NamedTuple):
    """Per query, (Q, 1) each: its error bound against a row e is
    per_residual |e - e'| + per_rounded |e'| + per_norm |e| (+ slack (1 + |e|))."""

    per_residual: jax.Array  # |q|
    per_rounded: jax.Array  # |q - q'| + D u |q'|
    per_norm: jax.Array  # D u |q|
    slack: jax.Array


def _query_terms(q_QxD: jax.Array) -> _QueryTerms:
    rounded_QxD = q_QxD.astype(jnp.bfloat16).astype(jnp.float32)
    norm = jnp.linalg.norm(q_QxD, axis=1, keepdims=True)
    gamma = q_QxD.shape[1] * _F32_UNIT_ROUNDOFF
    per_rounded = jnp.linalg.norm(q_QxD - rounded_QxD, axis=1, keepdims=True) + gamma * jnp.linalg.norm(
        rounded_QxD, axis=1, keepdims=True)  # fmt: skip
    return _QueryTerms(norm, per_rounded, gamma * norm, _ABSOLUTE_SLACK * (1.0 + norm))


def _error_bound(terms: _QueryTerms, rounded_norm: jax.Array, residual_norm: jax.Array) -> jax.Array:
    """Bounds on |q.e - fl(q'.e')|, broadcast over (Q, M) rows (or groups, with their largest norms)."""
    norm = rounded_norm + residual_norm  # >= |e|
    error = terms.per_residual * residual_norm + terms.per_rounded * rounded_norm + terms.per_norm * norm
    return _SAFETY * error + terms.slack * (1.0 + norm)


def approximate_scores(q_QxD: jax.Array, t: Tables) -> jax.Array:
    """fl(q'.e') (Q, N rounded up to whole groups): the bfloat16 matmul."""
    return jnp.einsum("qd,nd->qn", q_QxD.astype(jnp.bfloat16), t.rows_NxD, preferred_element_type=jnp.float32)


def error_bounds(q_QxD: jax.Array, t: Tables) -> jax.Array:
    """Bounds (Q, N) on |q.e - fl(q'.e')| for every row (what the search computes only for its candidates)."""
    return _error_bound(_query_terms(q_QxD), t.rounded_norm_N, t.residual_norm_N)


def prescreened_topk(q_QxD: jax.Array, emb_NxD: jax.Array, t: Tables, k: int, *,
                     precision=jax.lax.Precision.HIGHEST) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """(rows_QxK int32, scores_QxK float32, certified_Q bool): the float32 top-k of every certified query, best
    first; an uncertified query's rows are a best guess that must be searched again. k must be static.

    Three cuts, each keeping whatever could still beat the k-th exact score: the C groups whose best bfloat16
    score plus the group's error bound is largest; among their rows, the C with the largest upper bounds; of
    those, the k best exact scores. Certified: the largest bound left out at either cut is below the k-th."""
    n, q = emb_NxD.shape[0], q_QxD.shape[0]
    c = num_candidates(k)
    num_groups = t.rows_NxD.shape[0] // _GROUP
    if not applies(n, k):
        raise ValueError(f"{n} rows are too few to pre-select {c} groups of {_GROUP} for k={k}: search them all")
    approx_QxGxW = approximate_scores(q_QxD, t).reshape(q, num_groups, _GROUP)
    terms = _query_terms(q_QxD)
    group_bound_QxG = approx_QxGxW.max(axis=2) + _error_bound(terms, t.rounded_norm_G, t.residual_norm_G)
    group_bound_QxC1, groups_QxC1 = _top_k(group_bound_QxG, c + 1)
    groups_QxC = groups_QxC1[:, :c]
    cols_QxR = (groups_QxC[:, :, None] * _GROUP + jnp.arange(_GROUP)).reshape(q, c * _GROUP)
    approx_QxR = jnp.take_along_axis(approx_QxGxW, groups_QxC[:, :, None], axis=1).reshape(q, c * _GROUP)
    valid_QxR = cols_QxR < n  # the zero rows padding the last group
    safe_QxR = jnp.where(valid_QxR, cols_QxR, 0)
    row_bound_QxR = approx_QxR + _error_bound(terms, t.rounded_norm_N[safe_QxR], t.residual_norm_N[safe_QxR])
    row_bound_QxR = jnp.where(valid_QxR, row_bound_QxR, -jnp.inf)
    row_bound_QxC1, picks_QxC1 = _top_k(row_bound_QxR, c + 1)
    cand_QxC = jnp.take_along_axis(safe_QxR, picks_QxC1[:, :c], axis=1)
    exact_QxC = jnp.einsum("qd,qcd->qc", q_QxD, emb_NxD[cand_QxC], precision=precision)
    exact_QxC = jnp.where(row_bound_QxC1[:, :c] > -jnp.inf, exact_QxC, -jnp.inf)
    scores_QxK, pos_QxK = _top_k(exact_QxC, k)
    left_out_Q = jnp.maximum(group_bound_QxC1[:, c], row_bound_QxC1[:, c])
    certified_Q = left_out_Q < scores_QxK[:, k - 1]
    return jnp.take_along_axis(cand_QxC, pos_QxK, axis=1).astype(jnp.int32), scores_QxK, certified_Q
