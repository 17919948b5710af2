"""A model's whole state is part of the model, and a file never runs code by itself (issue 24).

A user's CNN with BatchNorm and Dropout, trained by the user's own loop in train mode: its statistics
go into the ``.gqz`` and come back exactly; the rebuilt model predicts exactly as the saved one and
its ONNX export matches it. A file naming a factory is refused unless the caller trusts it.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import gmm_quant as gq
from gmm_quant.formats import export
from gmm_quant.training import data

USER_MODULE = textwrap.dedent(
    """
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.out = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.conv(x)))
            return self.out(self.drop(x).reshape(x.shape[0], -1))

    def make_net(rngs=None):
        return Net(rngs or nnx.Rngs(0))
    """
)


@pytest.fixture()
def user_bn(tmp_path, monkeypatch):
    (tmp_path / "user_bn.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_bn

    return user_bn


def _trained_by_the_user(user_bn):
    """The user's own training loop (nnx.Optimizer, train mode), then eval mode."""
    ds = data.load_digits()
    model = user_bn.make_net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        grads = nnx.grad(loss)(model)
        opt.update(model, grads)

    model.train()
    for i in range(0, 1024, 64):
        step(model, opt, ds.x_train[i : i + 64], ds.y_train[i : i + 64])
    model.eval()
    return model, ds


def _compressed(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    return graphdef, codebooks, snapped, rest


def test_batchnorm_statistics_survive_save_load_and_export(user_bn, tmp_path):
    model, ds = _trained_by_the_user(user_bn)
    graphdef, codebooks, snapped, rest = _compressed(model)
    mean = np.asarray(rest["bn"]["mean"][...])
    assert np.abs(mean).max() > 1e-3  # the user's training moved the statistics
    path = tmp_path / "bn.gqz"
    gq.save_compressed(path, codebooks, snapped, model="user_bn:make_net", state=rest)

    loaded = gq.load_model(path, trust_model=True)  # in eval mode
    np.testing.assert_array_equal(np.asarray(loaded.bn.mean[...]), mean)
    np.testing.assert_array_equal(np.asarray(loaded.bn.var[...]), np.asarray(rest["bn"]["var"][...]))
    saved = nnx.merge(graphdef, snapped, rest)
    saved.eval()
    x = ds.x_test
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(saved(x)))  # predicts exactly alike

    out = tmp_path / "bn.onnx"
    info = export.export_file(path, out, sample=x[:64], trust_model=True)
    assert info["max_abs_diff"] <= 1e-4
    for batch in (1, 7, 64):
        np.testing.assert_allclose(export.run_onnx(out.read_bytes(), x[:batch]), np.asarray(saved(x[:batch])),
                                   atol=1e-4)  # fmt: skip


def test_a_file_without_state_warns_instead_of_predicting_silently_wrong(user_bn, tmp_path):
    model, _ = _trained_by_the_user(user_bn)
    _, codebooks, snapped, _ = _compressed(model)
    path = tmp_path / "stateless.gqz"
    gq.save_compressed(path, codebooks, snapped, model="user_bn:make_net", version=2)  # as files were
    assert path.read_bytes()[4:6] == (2).to_bytes(2, "little")
    with pytest.warns(UserWarning, match="holds no model state.*bn/mean"):
        gq.load_model(path, trust_model=True)


def test_state_of_any_dtype_comes_back_exactly_and_counts_in_the_han_size(tmp_path):
    params = {"k": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "b": np.zeros(8, np.float32)}
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    state = {
        "stats": {"mean": np.arange(8, dtype=np.float32) / 3, "half": np.arange(4, dtype=ml_dtypes.bfloat16)},
        "count": np.array([7], np.uint32),
        "rng": {"key": jax.random.key(3)},  # a random-number key: not stored, not counted
    }
    path = tmp_path / "s.gqz"
    gq.save_compressed(path, codebooks, snapped, state=state)
    stored = gq.load_compressed(path).state
    assert set(stored) == {"stats/mean", "stats/half", "count"}
    for name, want in (("stats/mean", state["stats"]["mean"]), ("stats/half", state["stats"]["half"]),
                       ("count", state["count"])):  # fmt: skip
        assert stored[name].dtype == want.dtype, name
        np.testing.assert_array_equal(stored[name], want)
    plain = gq.summarize(codebooks, snapped)
    counted = gq.summarize(codebooks, snapped, state=state)
    assert counted["float_values"] == plain["float_values"] + 8 + 4 + 1
    assert counted["han_bits"] == plain["han_bits"] + 32 * (8 + 4 + 1)


def _file_naming(tmp_path, spec) -> str:
    params = {"k": np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)}
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    path = tmp_path / "evil.gqz"
    gq.save_compressed(path, codebooks, snapped, model=spec)
    return str(path)


@pytest.mark.parametrize("spec", ["os:abort", "side_effect:make"])
def test_a_file_never_runs_code_by_itself(tmp_path, spec):
    """A file naming ``os:abort`` or a module with import side effects: refused in one line by the
    library and the export command, nothing imported, nothing called."""
    (tmp_path / "side_effect.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef make():\n    raise SystemExit(9)\n"
    )
    path = _file_naming(tmp_path, spec)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = (
        "import sys, gmm_quant as gq\n"
        "try:\n    gq.load_model(sys.argv[1])\nexcept ValueError as err:\n    print(err); sys.exit(3)\n"
        "mod = sys.argv[2].split(':')[0]\nprint('imported' if mod in sys.modules and mod != 'os' else 'no')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, path, spec], capture_output=True, text=True, env=env)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "trust_model=True" in out.stdout and spec in out.stdout
    cmd = [
        sys.executable,
        "-m",
        "gmm_quant.export",
        path,
        "-o",
        str(tmp_path / "x.onnx"),
        "--input-shape",
        "4",
    ]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "--trust-model" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "imported").exists() and not (tmp_path / "x.onnx").exists()


def test_trusted_factories_and_the_projects_own_models_load(tmp_path, user_bn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stateless model: nothing to warn about
        path = _file_naming(tmp_path, None)
        assert gq.load_compressed(path).params({"k": np.zeros((4, 4), np.float32)})["k"].shape == (4, 4)


def test_the_prior_takes_bf16_weights_and_returns_their_gradient_in_bf16():
    """Half-precision weights go through the prior in float32; the gradient comes back in bf16, equal
    to the float32 computation's gradient rounded to bf16."""
    w16 = jnp.asarray(np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100), jnp.bfloat16)
    cfg = gq.MixtureConfig()
    state = gq.core.init_mixture(cfg, [w16.astype(jnp.float32)])
    g16 = jax.grad(lambda w: gq.core.log_prob(cfg, state, [w]))(w16)
    g32 = jax.grad(lambda w: gq.core.log_prob(cfg, state, [w]))(w16.astype(jnp.float32))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g16), np.asarray(g32.astype(jnp.bfloat16)))


def test_a_bf16_model_pretrains_retrains_and_finetunes():
    """Retraining works in the parameters' dtype (the prior in float32 inside); the snapped weights
    are the codebook's float32 centres (bf16 codebooks and bf16 export are not done yet)."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            kw = {"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16, "rngs": rngs}
            self.hidden, self.out = nnx.Linear(64, 64, **kw), nnx.Linear(64, 10, **kw)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))).astype(jnp.float32)

    ds = data.load_digits()
    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    train = (ds.x_train, ds.y_train)
    params = gq.pretrain(apply, params, train, epochs=10)
    before = gq.error_rate(apply, params, ds.x_test, ds.y_test)
    plan = gq.make_plan(params)
    mixtures, params = gq.retrain(apply, params, train, plan, epochs=6, warmup_epochs=2)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    codebooks, snapped = gq.compress(plan, mixtures, params)
    codebooks, final = gq.finetune(apply, codebooks, snapped, train, epochs=2)
    assert gq.error_rate(apply, final, ds.x_test, ds.y_test) <= before + 0.05
