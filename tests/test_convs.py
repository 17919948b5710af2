"""Convolutions as im2col matrix products (training on CPU): the same values and gradients as XLA's
convolution, for the layouts, strides and paddings Flax layers produce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmm_quant.training import convs

CASES = [  # (input shape, kernel shape, strides, padding, dimension numbers)
    ((3, 12, 12, 2), (5, 5, 2, 4), (1, 1), "VALID", ("NHWC", "HWIO", "NHWC")),
    ((3, 12, 11, 2), (3, 3, 2, 4), (2, 2), "SAME", ("NHWC", "HWIO", "NHWC")),
    ((2, 3, 10, 9), (4, 3, 3, 2), (1, 2), ((1, 2), (0, 1)), ("NCHW", "OIHW", "NCHW")),
    ((2, 16, 3), (5, 3, 6), (1,), "SAME", ("NWC", "WIO", "NWC")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[4][0]}-{c[2]}-{c[3]}")
def test_values_and_gradients_match_xla_convolution(case):
    shape, kshape, strides, padding, dn = case
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (shape, kshape))

    def f(x, w):
        out = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
        return jnp.sum(jnp.sin(out))

    ours = convs.as_matmuls(f)
    np.testing.assert_allclose(ours(x, w), f(x, w), rtol=1e-5)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(f, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    rewritten = str(jax.make_jaxpr(ours)(x, w))
    assert "conv_general_dilated" not in rewritten and "dot_general" in rewritten


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
        self.out = nnx.Linear(4 * 64, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.grouped(jax.nn.relu(self.conv(x)))).reshape(x.shape[0], -1))


def test_a_flax_model_keeps_its_outputs_and_grouped_convolutions_stay_with_xla():
    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8, 8, 1)), jnp.float32)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    ours = convs.as_matmuls(loss)
    np.testing.assert_allclose(ours(params), loss(params), rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(jax.grad(ours)(params)), jax.tree.leaves(jax.grad(loss)(params)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert str(jax.make_jaxpr(ours)(params)).count("conv_general_dilated") == 1  # the grouped one


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 9, 7, 3)], ids=["even", "odd (VALID drops the rest)"])
def test_a_tiling_max_pool_matches_flax(shape):
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)

    def f(x):
        return jnp.sum(jnp.sin(nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))))

    ours = convs.as_matmuls(f)
    np.testing.assert_allclose(ours(x), f(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(f)(x), rtol=1e-6)
    assert "reduce_window_max" not in str(jax.make_jaxpr(ours)(x))
    overlapping = convs.as_matmuls(lambda x: jnp.sum(nnx.max_pool(x, window_shape=(3, 3), strides=(1, 1))))
    assert "reduce_window_max" in str(jax.make_jaxpr(overlapping)(x))  # left to XLA
