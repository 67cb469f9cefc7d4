"""bfloat16 matmuls that run as bfloat16 on XLA:CPU: inputs in bfloat16, accumulation in float32 (forward and
backward), as the dense layers and the LM head use them when a model computes in bfloat16 (model.compute_dtype)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def is_low_precision(dtype: Dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_f32_accumulate(x: jax.Array, w: jax.Array, w_transposed: bool, out_dtype: Dtype) -> jax.Array:
    """x @ w (x (..., N, I), w (..., I, O)) or x @ w.T (w_transposed, w (..., O, I)) -> (..., N, O), batched over
    the leading dims both share, for bfloat16 x and w: accumulated in float32 and returned in `out_dtype`; the
    backward products likewise (bfloat16 inputs, float32 accumulation, gradients in the inputs' dtypes).

    Why: XLA:CPU computes a bfloat16 x bfloat16 -> bfloat16 dot as a float32 dot between converts (no faster than
    float32), while bfloat16 x bfloat16 -> float32 runs a bfloat16 GEMM kernel (avx512_bf16 / AMX). jax's own
    backward of a dot with a float32 result would multiply the float32 cotangent with a bfloat16 operand (float32
    again), so the backward is written out here with the cotangent in the inputs' dtype, as torch.autocast does."""
    return _forward(x, w, w_transposed).astype(out_dtype)


def _dot(a: jax.Array, b: jax.Array, a_contract: int, b_contract: int) -> jax.Array:
    """a . b contracting one axis of each (counted from the end), batched over the leading ndim - 2 axes."""
    batch = tuple(range(a.ndim - 2))
    dims = (((a.ndim - a_contract,), (b.ndim - b_contract,)), (batch, batch))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _forward(x, w, w_transposed):
    return _dot(x, w, 1, 1 if w_transposed else 2)


def _matmul_fwd(x, w, w_transposed, out_dtype):
    return _forward(x, w, w_transposed).astype(out_dtype), (x, w)


def _matmul_bwd(w_transposed, out_dtype, residuals, g_NxO):
    del out_dtype
    x_NxI, w = residuals
    g_NxO = g_NxO.astype(x_NxI.dtype)
    if w_transposed:  # w (O, I): dx = g @ w, dw = g.T @ x
        dx, dw = _dot(g_NxO, w, 1, 2), _dot(g_NxO, x_NxI, 2, 2)
    else:  # w (I, O): dx = g @ w.T, dw = x.T @ g
        dx, dw = _dot(g_NxO, w, 1, 1), _dot(x_NxI, g_NxO, 2, 2)
    return dx.astype(x_NxI.dtype), dw.astype(w.dtype)


matmul_f32_accumulate.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for DenseGeneral in bfloat16: a product that contracts lhs's trailing axes with rhs's
    leading ones (every dense layer here) runs as matmul_f32_accumulate; anything else as lax.dot_general."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    n = len(lhs_contract)
    plain = (batch != ((), ()) or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
             or tuple(rhs_contract) != tuple(range(n)) or not is_low_precision(lhs.dtype) or lhs.dtype != rhs.dtype)
    if plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    inner = int(np.prod(rhs.shape[:n]))
    out = matmul_f32_accumulate(lhs.reshape(-1, inner), rhs.reshape(inner, -1), False, lhs.dtype)
    return out.reshape(lhs.shape[: lhs.ndim - n] + rhs.shape[n:])
