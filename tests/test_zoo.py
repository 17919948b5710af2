"""The layer zoo: one small model per family of Flax NNX's standard layers, compressed (random weights,
the initial mixture) and exported in every encoding; ONNX Runtime must equal JAX at batch 1, 7 and 64."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gmm_quant as gq
from gmm_quant.core import grid
from gmm_quant.formats import export, onnx_export
from models.zoo import ZOO


def _inputs(kind, batch, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        return rng.integers(0, 50, size=(batch, 5)).astype(np.int32)
    return rng.normal(size=(batch, *kind)).astype(np.float32)


def _compressed(name):
    make, kind = ZOO[name]
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)  # BatchNorm statistics stay in ``rest``

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    plan = gq.make_plan(params, mixture=gq.MixtureConfig(num_components=9))
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    return apply_fn, snapped, codebooks, kind


@pytest.mark.parametrize("encoding", export.ENCODINGS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_exports_and_matches_jax(name, encoding):
    apply_fn, params, codebooks, kind = _compressed(name)
    if encoding == "grid":
        codebooks = {p: grid.to_grid(cb, 4) for p, cb in codebooks.items()}
        params = gq.dequantize(codebooks, params)
    model = export.to_onnx(apply_fn, params, codebooks, _inputs(kind, 8), encoding=encoding)
    session = export.session(model)
    for batch in (1, 7, 64):
        x = _inputs(kind, batch, seed=batch)
        ours = session.run(None, {"input": x})[0]
        ref = np.asarray(apply_fn(params, x))
        assert ours.shape == ref.shape == (batch, 10)
        assert np.max(np.abs(ours - ref)) <= 1e-4, (name, batch, float(np.max(np.abs(ours - ref))))
    stored = {i.name for i in model.graph.initializer}
    for path in codebooks:  # every quantised leaf is stored as indices, not as float weights
        assert any(n.startswith(path.replace("/", "_") + ("_q" if encoding == "grid" else "_indices"))
                   for n in stored), path  # fmt: skip


def test_unsupported_primitive_names_itself_and_where():
    def apply_fn(p, x):
        return jnp.sort(x @ p["w"], axis=-1)

    params = {"w": jnp.ones((4, 10))}
    with pytest.raises(NotImplementedError, match=r"primitive 'sort' at .*test_zoo.py"):
        export.to_onnx(apply_fn, params, {}, np.ones((2, 4), np.float32))


def test_every_registered_handler_is_a_jax_primitive_name():
    assert {"dot_general", "conv_general_dilated", "reduce_window_sum", "erfc", "rsqrt", "gather"} <= set(
        onnx_export.supported_primitives()
    )
