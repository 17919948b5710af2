"""Dead units disconnected (surgery/dead_units.py): on hand-built models with dead units, the rows that
read them are zeroed and folded into the next bias, the outputs equal a numpy forward pass of the model
given, and what must be left alone is."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import gmm_quant as gq
from gmm_quant.core.codebook import make_codebook
from gmm_quant.core.rules import flatten, replace_leaves

CENTRES = np.array([0.0, -0.5, 0.5, 1.0], np.float32)


def _relu(v):
    return np.maximum(v, 0.0)


def _quantise(params, paths, rng):
    """``params`` with the kernels ``paths`` drawn from CENTRES (no zeros), and their codebooks."""
    flat, books = flatten(params), {}
    for p in paths:
        w = CENTRES[rng.integers(1, len(CENTRES), size=np.shape(flat[p]))]
        books[p] = make_codebook(w, CENTRES)
        flat[p] = w
    return replace_leaves(params, flat), books


def _set(params, path, fn):
    flat = flatten(params)
    value = np.array(flat[path], np.float32)
    fn(value)
    return replace_leaves(params, {path: value})


def _check_codebooks(result):
    flat = flatten(result.params)
    for p, cb in result.codebooks.items():
        np.testing.assert_array_equal(np.asarray(cb.dequantize()), np.asarray(flat[p]), err_msg=p)


class _Mlp(nnx.Module):
    def __init__(self, rngs, sizes=(6, 5, 4, 3), dtype=None):
        self.layers = nnx.List(
            [nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def _mlp_forward(params, x):
    flat = {p: np.asarray(v, np.float64) for p, v in flatten(params).items()}
    for i in range(3):
        x = x @ flat[f"layers/{i}/kernel"] + flat[f"layers/{i}/bias"]
        x = _relu(x) if i < 2 else x
    return x


def _mlp(dtype=None):
    rng = np.random.default_rng(0)
    graphdef, params = nnx.split(_Mlp(nnx.Rngs(0), dtype=dtype), nnx.Param)
    kernels = [f"layers/{i}/kernel" for i in range(3)]
    params, books = _quantise(params, kernels, rng)

    def dead(w):
        w[:, 1] = 0.0  # unit 1: bias 0.7 -> a constant 0.7 after ReLU
        w[:, 3] = 0.0  # unit 3: bias -0.2 -> 0 after ReLU

    params = _set(params, "layers/0/kernel", dead)
    params = _set(params, "layers/0/bias", lambda b: b.__setitem__(slice(None), [0.1, 0.7, 0.2, -0.2, 0.3]))
    params = _set(
        params, "layers/1/kernel", lambda w: w.__setitem__(([0, 2, 4], 0), 0.0)
    )  # unit 0 reads 1, 3 only
    books = {p: make_codebook(np.asarray(flatten(params)[p]), CENTRES) for p in kernels}
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params, books


def test_rows_reading_dead_units_are_zeroed_and_folded_into_the_next_bias():
    apply_fn, params, books = _mlp()
    x = np.random.default_rng(1).normal(size=(32, 6)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x[:8])
    before, after = flatten(params), flatten(result.params)
    w1 = np.asarray(before["layers/1/kernel"], np.float64)
    new1 = np.asarray(after["layers/1/kernel"])
    assert not new1[[1, 3]].any() and np.array_equal(new1[[0, 2, 4]], w1[[0, 2, 4]])
    b1 = np.asarray(before["layers/1/bias"], np.float64) + 0.7 * w1[1]  # the constant ReLU(0.7) folded
    np.testing.assert_allclose(np.asarray(after["layers/1/bias"]), b1, rtol=1e-6)
    # unit 0 of layer 1 read only dead units: dead in turn, so layer 2's row 0 goes in the next round
    assert not np.asarray(after["layers/2/kernel"])[0].any()
    assert np.asarray(before["layers/2/kernel"])[0].any()
    assert result.weights == {"layers/1/kernel": 8, "layers/2/kernel": 3}  # 2 rows of 4, a row of 3
    _check_codebooks(result)
    np.testing.assert_allclose(_mlp_forward(result.params, x), _mlp_forward(params, x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply_fn(result.params, x)), _mlp_forward(params, x), atol=1e-5)
    han = [
        gq.summarize(b, p)["compression_ratio"]
        for b, p in ((books, params), (result.codebooks, result.params))
    ]
    assert han[1] > han[0]


def test_a_coded_bias_takes_no_fold_only_rows_whose_constant_is_zero_go():
    apply_fn, params, books = _mlp()
    x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x, coded={"layers/1/bias": None})
    new1, old1 = (
        np.asarray(flatten(result.params)["layers/1/kernel"]),
        np.asarray(flatten(params)["layers/1/kernel"]),
    )
    assert not new1[3].any() and np.array_equal(new1[1], old1[1])  # unit 3 is ReLU(-0.2) = 0; unit 1 is 0.7
    np.testing.assert_array_equal(flatten(result.params)["layers/1/bias"], flatten(params)["layers/1/bias"])
    np.testing.assert_allclose(_mlp_forward(result.params, x), _mlp_forward(params, x), atol=1e-5)


class _ConvNet(nnx.Module):
    def __init__(self, rngs, padding="VALID"):
        self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), padding=padding, rngs=rngs)
        self.fc = nnx.Linear(4 * 2 * 2 if padding == "VALID" else 4 * 3 * 3, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return self.fc(x.reshape(x.shape[0], -1))


def _convnet(padding):
    graphdef, params = nnx.split(_ConvNet(nnx.Rngs(0), padding), nnx.Param)
    params, books = _quantise(params, ["conv/kernel", "conv2/kernel", "fc/kernel"], np.random.default_rng(2))
    params = _set(params, "conv/kernel", lambda w: w[..., 1].__imul__(0.0))  # filter 1: bias 0.3
    params = _set(params, "conv/bias", lambda b: b.__setitem__(slice(None), [0.1, 0.3, 0.1, 0.1]))
    params = _set(params, "conv2/kernel", lambda w: w[..., 2].__imul__(0.0))  # filter 2: bias 0.4
    params = _set(params, "conv2/bias", lambda b: b.__setitem__(slice(None), [0.0, 0.1, 0.4, 0.2]))
    books = {p: make_codebook(np.asarray(flatten(params)[p]), CENTRES) for p in books}
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params, books


def test_a_dead_filter_is_followed_through_pooling_and_flattening_and_into_a_valid_convolution():
    apply_fn, params, books = _convnet("VALID")
    x = np.random.default_rng(3).normal(size=(16, 8, 8, 1)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x[:8])
    flat = flatten(result.params)
    assert not np.asarray(flat["conv2/kernel"])[:, :, 1, :].any()  # the input channel of filter 1
    fc = np.asarray(flat["fc/kernel"])
    assert (
        not fc[2::4].any() and np.asarray(flatten(params)["fc/kernel"])[2::4].any()
    )  # flattened: f % 4 == 2
    assert fc[np.arange(16) % 4 != 2].all()  # nothing else moved
    _check_codebooks(result)
    np.testing.assert_allclose(
        np.asarray(apply_fn(result.params, x)), np.asarray(apply_fn(params, x)), rtol=1e-6, atol=1e-5
    )


def test_a_padded_convolution_keeps_the_rows_of_a_non_zero_constant():
    apply_fn, params, books = _convnet("SAME")
    x = np.random.default_rng(3).normal(size=(16, 8, 8, 1)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x[:8])
    flat = flatten(result.params)
    np.testing.assert_array_equal(
        flat["conv2/kernel"], flatten(params)["conv2/kernel"]
    )  # SAME: the edges differ
    assert not np.asarray(flat["fc/kernel"])[2::4].any()
    np.testing.assert_allclose(
        np.asarray(apply_fn(result.params, x)), np.asarray(apply_fn(params, x)), rtol=1e-6, atol=1e-5
    )


class _BatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 5, rngs=rngs)
        self.norm = nnx.BatchNorm(5, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def test_a_batchnorm_model_in_train_mode_folds_the_normalised_constant():
    model = _BatchNormNet(nnx.Rngs(0))
    model.norm.mean[...] = jnp.asarray([0.3, -0.2, 0.1, 0.0, 0.5])
    model.norm.var[...] = jnp.asarray([2.0, 0.5, 1.0, 1.5, 0.8])
    apply_fn, params = gq.from_nnx(model)
    params, books = _quantise(params, ["hidden/kernel", "out/kernel"], np.random.default_rng(4))
    params = _set(params, "hidden/kernel", lambda w: w[:, 2].__imul__(0.0))
    books = {p: make_codebook(np.asarray(flatten(params)[p]), CENTRES) for p in books}
    x = np.random.default_rng(5).normal(size=(32, 6)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x[:8])
    assert not np.asarray(flatten(result.params)["out/kernel"])[2].any()
    flat = {p: np.asarray(v, np.float64) for p, v in flatten(params).items()}
    h = x @ flat["hidden/kernel"] + flat["hidden/bias"]
    mean, var = np.array([0.3, -0.2, 0.1, 0.0, 0.5]), np.array([2.0, 0.5, 1.0, 1.5, 0.8])
    h = _relu((h - mean) / np.sqrt(var + 1e-5) * flat["norm/scale"] + flat["norm/bias"])
    expected = h @ flat["out/kernel"] + flat["out/bias"]  # eval mode: no dropout
    np.testing.assert_allclose(np.asarray(apply_fn(result.params, x)), expected, atol=1e-4)


class _Residual(nnx.Module):
    def __init__(self, rngs):
        self.inner = nnx.Linear(6, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.inner(x)) + x) + self.out(x)  # mixed with the input; out read twice


def test_a_residual_add_or_a_kernel_read_twice_leaves_the_model_as_it_was():
    graphdef, params = nnx.split(_Residual(nnx.Rngs(0)), nnx.Param)
    params, books = _quantise(params, ["inner/kernel", "out/kernel"], np.random.default_rng(6))
    params = _set(params, "inner/kernel", lambda w: w[:, 0].__imul__(0.0))
    books = {p: make_codebook(np.asarray(flatten(params)[p]), CENTRES) for p in books}
    result = gq.disconnect_dead_units(
        lambda p, x: nnx.merge(graphdef, p)(x), params, books, np.ones((4, 6), np.float32)
    )
    assert result.weights == {} and result.params is params and result.codebooks is books


def test_a_linen_model_is_disconnected_too():
    class Mlp(linen.Module):
        @linen.compact
        def __call__(self, x, train=False):
            return linen.Dense(3, name="out")(linen.relu(linen.Dense(5, name="hidden")(x)))

    module = Mlp()
    variables = module.init(jax.random.key(0), np.zeros((1, 6), np.float32))
    apply_fn, params = gq.from_linen(module, variables)
    params, books = _quantise(params, ["hidden/kernel", "out/kernel"], np.random.default_rng(7))
    params = _set(params, "hidden/kernel", lambda w: w[:, 4].__imul__(0.0))
    params = _set(params, "hidden/bias", lambda b: b.__setitem__(4, 0.5))
    books = {p: make_codebook(np.asarray(flatten(params)[p]), CENTRES) for p in books}
    x = np.random.default_rng(8).normal(size=(16, 6)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x[:4])
    assert not np.asarray(flatten(result.params)["out/kernel"])[4].any()
    np.testing.assert_allclose(
        np.asarray(apply_fn(result.params, x)), np.asarray(apply_fn(params, x)), rtol=1e-6, atol=1e-5
    )


def test_a_bf16_model_is_disconnected_within_its_precision():
    apply_fn, params, books = _mlp(dtype=jnp.bfloat16)
    x = np.random.default_rng(1).normal(size=(32, 6)).astype(np.float32)
    result = gq.disconnect_dead_units(apply_fn, params, books, x[:8])
    assert not np.asarray(flatten(result.params)["layers/1/kernel"])[[1, 3]].any()
    got = np.asarray(apply_fn(result.params, x), np.float32)
    np.testing.assert_allclose(got, _mlp_forward(params, x), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("sample", [np.zeros((4, 6), np.float32)])
def test_nothing_dead_changes_nothing(sample):
    graphdef, params = nnx.split(_Mlp(nnx.Rngs(0)), nnx.Param)
    params, books = _quantise(params, [f"layers/{i}/kernel" for i in range(3)], np.random.default_rng(9))
    result = gq.disconnect_dead_units(lambda p, x: nnx.merge(graphdef, p)(x), params, books, sample)
    assert result.weights == {} and result.params is params


def test_a_run_disconnects_after_fine_tuning_and_reports_it():
    from gmm_quant.run import config as cfgm
    from gmm_quant.run import report, stages

    apply_fn, params, books = _mlp()
    x = np.random.default_rng(1).normal(size=(32, 6)).astype(np.float32)
    ctx = stages.Context(cfgm.Config(), (x, np.zeros(32, np.int32)), (x[:16], np.zeros(16, np.int32)), None)
    model = stages.Model(apply_fn, params)
    codebooks, model = stages.disconnect(ctx, books, model)
    assert model.disconnected == {"layers/1/kernel": 8, "layers/2/kernel": 3}
    assert not np.asarray(codebooks["layers/1/kernel"].indices)[[1, 3]].any()
    np.testing.assert_allclose(np.asarray(apply_fn(model.params, x)), _mlp_forward(params, x), atol=1e-5)
    summary = gq.summarize(codebooks, model.params)
    metrics = report.metrics_dict({"finetuned": 0.1}, summary, {"disconnected": model.disconnected})
    assert "weights reading dead units, zeroed: layers/1/kernel 8  layers/2/kernel 3" in report.format_table(
        metrics
    )


def test_a_kernel_also_read_through_a_reshape_counts_as_read_twice():
    from gmm_quant.surgery import unit_flow

    def apply_fn(p, x):
        h = jnp.maximum(x @ p["a"]["kernel"] + p["a"]["bias"], 0.0)
        return h @ p["b"]["kernel"] + p["b"]["bias"] + jnp.sum(p["b"]["kernel"].reshape(-1))

    rng = np.random.default_rng(10)
    params = {n: {"kernel": rng.normal(size=s).astype(np.float32), "bias": np.full(s[1], 0.5, np.float32)}
              for n, s in (("a", (6, 5)), ("b", (5, 3)))}  # fmt: skip
    params, books = _quantise(params, ["a/kernel", "b/kernel"], rng)
    params = _set(params, "a/kernel", lambda w: w[:, 2].__imul__(0.0))
    books["a/kernel"] = make_codebook(np.asarray(params["a"]["kernel"]), CENTRES)
    found = unit_flow.Trace(apply_fn, params, np.ones((4, 6), np.float32)).readers(flatten(params))
    assert found.uses["b/kernel"] == 2 and found.uses["a/kernel"] == 1 and found.uses["b/bias"] == 1
    assert [r.kernel for r in found.readers] == ["b/kernel"]
    result = gq.disconnect_dead_units(apply_fn, params, books, np.ones((4, 6), np.float32))
    assert result.weights == {}
