"""What every search backend shares: the `Searcher` interface, argument checks, and the cross-shard top-k merge.

A backend searches rows [offset, offset + n) of the corpus (all of it, one device's slice, or one host's
ScaNN shard) and returns local candidates; `merge_topk` turns candidate lists from several such shards into
the global top-k, so the same code serves per-device shards and per-host ScaNN searchers.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Searcher(Protocol):
    """Maximum inner product search over the passage embeddings of one index."""

    num_passages: int

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (rows_QxK int32, scores_QxK float32), best first; rows index the corpus (0..N-1)."""
        ...


class SearchError(ValueError):
    """A search request that cannot be answered (bad k or query shape); says what to change."""


def check_search_args(queries_QxD, k: int, num_passages: int, dim: int) -> None:
    """Raises SearchError for a k outside [1, num_passages] or queries that are not Q x dim."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"k={k!r}: ask for at least one passage (a positive int)")
    if k > num_passages:
        raise SearchError(f"k={k} is larger than the corpus ({num_passages} passages); lower k (n_docs) or use a "
                          "bigger index")
    shape = getattr(queries_QxD, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != dim:
        raise SearchError(f"queries must be a Q x {dim} array (one question embedding a row), got shape {shape}")


def merge_topk(candidates: Sequence[tuple[np.ndarray, np.ndarray]], row_offsets: Sequence[int], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k from per-shard candidate lists.

    candidates: one (rows_QxKi, scores_QxKi) per shard, rows local to that shard (Ki may differ; a row of -1
      with score -inf marks "no candidate"). row_offsets: the global row of each shard's local row 0.
    Returns (rows_QxK int32, scores_QxK float32), best first; ties keep shard order, then the order within the
    shard. Raises SearchError if fewer than k real candidates exist for some query.
    """
    if len(candidates) != len(row_offsets) or not candidates:
        raise SearchError(f"merge_topk: got {len(candidates)} candidate lists and {len(row_offsets)} offsets; "
                          "pass one offset per shard")
    rows = np.concatenate([np.asarray(r, np.int64) + np.where(np.asarray(r) >= 0, off, 0)
                           for (r, _), off in zip(candidates, row_offsets)], axis=1)
    scores = np.concatenate([np.asarray(s, np.float32) for _, s in candidates], axis=1)
    if rows.shape != scores.shape:
        raise SearchError(f"merge_topk: rows {rows.shape} and scores {scores.shape} differ in shape")
    if rows.shape[1] < k:
        raise SearchError(f"merge_topk: only {rows.shape[1]} candidates per query for k={k}; ask each shard for k")
    scores = np.where(rows >= 0, scores, -np.inf)
    # Stable sort on the negated scores keeps the earlier (lower-offset) shard first among equal scores.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_rows = np.take_along_axis(rows, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    if np.any(top_rows < 0):
        raise SearchError(f"merge_topk: fewer than k={k} real candidates for some query; search more leaves or "
                          "ask each shard for more candidates")
    return top_rows.astype(np.int32), top_scores.astype(np.float32)
