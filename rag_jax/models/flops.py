"""Matmul FLOPs of the building blocks the networks share, counted analytically (2 FLOPs per multiply-add): the
pieces of each architecture's forward-pass formula (bart_generator.py, t5_generator.py, training/flops.py).
"""

from __future__ import annotations


def attention_block(rows: int, q_len: int, kv_len: int, width: int, kv_rows: int | None = None) -> int:
    """Q and output projections over rows*q_len tokens, K/V projections over kv_rows*kv_len tokens, and the
    score (QK^T) and weighted-value products: rows * q_len * kv_len * width each."""
    kv_rows = rows if kv_rows is None else kv_rows
    projections = 2 * 2 * rows * q_len * width * width + 2 * 2 * kv_rows * kv_len * width * width
    products = 2 * 2 * rows * q_len * kv_len * width
    return projections + products


def feed_forward(tokens: int, width: int, hidden: int) -> int:
    return 2 * 2 * tokens * width * hidden
