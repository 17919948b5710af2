"""The Python API without traps: names that do not shadow modules, grid fine-tuning from Python,
files that rebuild their own model, user models on the export command line (issue 10)."""

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

import gmm_quant
import gmm_quant as gq
import models
from gmm_quant.core import codebook_tuning, grid
from gmm_quant.formats import export
from gmm_quant.formats.onnx_export import encodings
from gmm_quant.training import data, finetuning, loop


def test_no_public_name_shadows_a_module():
    modules = {m.name for m in pkgutil.iter_modules(gmm_quant.__path__)}
    assert not modules & set(gq.__all__)
    from gmm_quant import finetune

    assert callable(finetune) and finetune is gq.finetune
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gmm_quant.finetune")
    for name in ("export_onnx", "error_rate", "summarize", "load_model"):
        assert callable(getattr(gq, name)), name


@pytest.fixture(scope="module")
def digits_grid_model():
    """The digits MLP pretrained, compressed (initial mixture) and rounded onto a 4-bit grid."""
    ds = data.load_digits()
    train = (ds.x_train, ds.y_train)
    graphdef, params = nnx.split(models.create("digits_mlp"), nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    params = gq.pretrain(apply_fn, params, train, epochs=20, batch_size=32)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    return apply_fn, codebooks, snapped, train


def test_finetune_with_grid_bits_keeps_a_grid_and_the_indices(digits_grid_model):
    apply_fn, codebooks, snapped, train = digits_grid_model
    tuned, params = gq.finetune(apply_fn, codebooks, snapped, train, epochs=1, batch_size=32, grid_bits=4)
    for path, cb in tuned.items():
        fitted = grid.fit(cb.centres)
        assert fitted is not None, path
        assert fitted[1] + fitted[2].max() <= 15  # still 4-bit codes
        np.testing.assert_array_equal(cb.indices, grid.to_grid(codebooks[path], 4).indices)
        np.testing.assert_array_equal(np.asarray(gq.core.rules.flatten(params)[path]), cb.dequantize())


def test_grid_finetuning_does_not_raise_the_training_loss_of_a_converged_model(digits_grid_model):
    apply_fn, codebooks, snapped, train = digits_grid_model
    run = dict(batch_size=32, grid_bits=4)
    converged, params = gq.finetune(apply_fn, codebooks, snapped, train, epochs=10, learning_rate=1e-3, **run)
    task = gq.cross_entropy(apply_fn)

    def train_loss(p):
        return loop.mean_loss(lambda p, x, y, step: task(p, x, y), p, *train)

    tuned, tuned_params = gq.finetune(apply_fn, converged, params, train, epochs=2, **run)
    assert train_loss(tuned_params) <= train_loss(params)
    for path, cb in tuned.items():  # the model returned is the codebooks returned, on a 4-bit grid
        np.testing.assert_array_equal(np.asarray(gq.core.rules.flatten(tuned_params)[path]), cb.dequantize())
        assert grid.fit(cb.centres) is not None


def test_keep_better_returns_the_start_when_training_made_it_worse():
    x, y = np.ones((4, 1), np.float32), np.zeros(4, np.int32)

    def loss(tr, xb, yb, step):
        return (tr["w"] - 1.0) ** 2, {}

    start, worse = {"w": np.float32(1.0)}, {"w": np.float32(3.0)}
    assert finetuning.keep_better(loss, start, worse, (x, y)) == (start, False)
    assert finetuning.keep_better(loss, worse, start, (x, y)) == (start, True)


USER_MODULE = textwrap.dedent(
    """
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.out = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.avg_pool(nnx.relu(self.conv(x)), window_shape=(2, 2), strides=(1, 1), padding="SAME")
            return self.out(x.reshape(x.shape[0], -1))

    def make_net(rngs=None):
        return Net(rngs or nnx.Rngs(0))
    """
)


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _save_user_model(path, spec):
    from gmm_quant.surgery.model_spec import make_model

    graphdef, params = nnx.split(make_model("user_nets:make_net"), nnx.Param)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    gq.save_compressed(path, codebooks, snapped, model=spec)
    return graphdef, snapped


def test_a_file_rebuilds_its_own_model_without_a_template(user_module):
    path = user_module / "net.gqz"
    graphdef, snapped = _save_user_model(path, "user_nets:make_net")
    with pytest.raises(ValueError, match="trust_model=True"):  # a file alone never runs code
        gq.load_model(path)
    loaded = gq.load_compressed(path).params(trust_model=True)
    for key, leaf in gq.core.rules.flatten(snapped).items():
        np.testing.assert_array_equal(np.asarray(gq.core.rules.flatten(loaded)[key]), np.asarray(leaf))
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(gq.load_model(path, trust_model=True)(x)), np.asarray(nnx.merge(graphdef, snapped)(x))
    )


def test_export_command_takes_a_model_from_the_users_module(user_module):
    path = user_module / "anonymous.gqz"
    _save_user_model(path, None)  # the file does not name its model
    out = user_module / "net.onnx"
    env = {**os.environ, "PYTHONPATH": f"{user_module}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "gmm_quant.export", str(path), "-o", str(out), "--input-shape", "8,8,1"]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "does not name its model" in refused.stderr
    done = subprocess.run([*cmd, "--model", "user_nets:make_net"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    x = np.random.default_rng(1).normal(size=(5, 8, 8, 1)).astype(np.float32)
    ours = export.run_onnx(out.read_bytes(), x)
    np.testing.assert_allclose(ours, np.asarray(gq.load_model(path, _user_model())(x)), atol=1e-5)


def _user_model():
    from gmm_quant.surgery.model_spec import make_model

    return make_model("user_nets:make_net")


def test_errors_raised_from_python_do_not_name_command_line_flags(digits_grid_model):
    off_grid = {"w": gq.Codebook(np.array([0.0, 0.1, np.pi / 10], np.float32), np.zeros(4, np.uint8))}
    with pytest.raises(ValueError) as err:
        codebook_tuning.grid_scales(off_grid)
    assert "--" not in str(err.value)
    with pytest.raises(ValueError) as err:
        encodings.grid_encoder(off_grid["w"])
    assert "--" not in str(err.value)
    with pytest.raises(data.DataError) as err:
        data.load_mnist("/nonexistent-dir")
    assert "--data-dir" not in str(err.value).replace("or --data-dir on the command line", "")
