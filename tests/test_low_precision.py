"""bfloat16 matmuls (rag_jax/models/low_precision.py): the products and gradients of float32, to bfloat16 rounding,
and a bfloat16 dense layer compiles to a bfloat16 GEMM on XLA:CPU (not a float32 one between converts)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.models import layers, low_precision


def _bf16(key, shape):
    return jax.random.normal(key, shape).astype(jnp.bfloat16)


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("batch_dims", [(), (2, 3)])
def test_matmul_and_its_gradients_match_float32(w_transposed, batch_dims):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = _bf16(kx, batch_dims + (5, 8))
    w = _bf16(kw, batch_dims + ((7, 8) if w_transposed else (8, 7)))
    g = jax.random.normal(kg, batch_dims + (5, 7))  # a float32 cotangent, as the LM head's

    def exact(x, w):
        w = jnp.swapaxes(w, -1, -2) if w_transposed else w
        return ((x.astype(jnp.float32) @ w.astype(jnp.float32)) * g).sum()

    def ours(x, w):
        return (low_precision.matmul_f32_accumulate(x, w, w_transposed, jnp.float32) * g).sum()

    (value, grads), (want_value, want_grads) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, w) for f in (ours, exact))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)  # bfloat16 inputs, float32 accumulation
    for got, want in zip(grads, want_grads):
        assert got.dtype == jnp.bfloat16  # the gradients of bfloat16 inputs
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2 * float(jnp.abs(want).max()))


def test_dense_dot_general_contracts_like_lax():
    """The contractions DenseGeneral makes (trailing input axes with leading kernel axes), and one that falls back
    to lax.dot_general."""
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    cases = [((4, 3, 8), (8, 5), ((2,), (0,))), ((4, 3, 2, 8), (2, 8, 5), ((2, 3), (0, 1))),
             ((4, 3, 8), (3, 5), ((1,), (0,)))]  # fmt: skip
    for (x_shape, w_shape, contract), kx, kw in zip(cases, keys[::2], keys[1::2]):
        x, w = _bf16(kx, x_shape), _bf16(kw, w_shape)
        dims = (contract, ((), ()))
        want = jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dims)
        got = jax.jit(low_precision.dot_general, static_argnums=2)(x, w, dims)
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2 * float(jnp.abs(want).max()))


def test_bfloat16_dense_layer_runs_a_bfloat16_gemm_on_cpu():
    """The point of low_precision: bfloat16 x bfloat16 dots survive XLA:CPU's compilation in the forward and in
    the input gradient (a plain bfloat16 DenseGeneral compiles to float32 dots between converts)."""
    dense = layers.dense(64, ("embed", "mlp"), dtype=jnp.bfloat16, param_dtype=jnp.float32, init_std=0.02, name="d")
    x = jnp.ones((256, 128), jnp.bfloat16)
    params = dense.init(jax.random.PRNGKey(0), x)
    loss = lambda p, x: dense.apply(p, x).astype(jnp.float32).sum()
    with jax.default_device(jax.devices("cpu")[0]):
        hlo = jax.jit(jax.grad(loss, argnums=1)).lower(params, x).compile().as_text()
    operand_types = []
    for computation in re.split(r"\n(?=%|ENTRY)", hlo):
        for dot in re.finditer(r" dot\((%[\w.]+), (%[\w.]+)\)", computation):
            operand_types += [re.search(re.escape(op) + r" = (\w+)\[", computation).group(1) for op in dot.groups()]
    assert operand_types and set(operand_types) == {"bf16"}, operand_types
