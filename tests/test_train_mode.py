"""Train mode is real (issue 24, part 2): models with BatchNorm and Dropout, written as NNX and Linen
users write them, go through pretrain -> retrain -> compress -> fine-tune -> save -> load -> export
with their statistics updated in training, fresh Dropout masks on every step from a resumable
stream, and eval mode for evaluation, files and ONNX.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from flax import nnx

import gmm_quant as gq
from gmm_quant.training import data, modes

DIGITS = data.load_digits()
X_TRAIN, Y_TRAIN = DIGITS.x_train.reshape(-1, 8, 8, 1)[:512], DIGITS.y_train[:512]
X_TEST, Y_TEST = DIGITS.x_test.reshape(-1, 8, 8, 1), DIGITS.y_test


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8 * 64, 10, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.out(x.reshape(x.shape[0], -1))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def nnx_model():
    return gq.from_nnx(NnxCNN(nnx.Rngs(0)))


def linen_model():
    module = LinenCNN()
    return gq.from_linen(module, module.init(jax.random.key(0), X_TRAIN[:2], train=False))


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.lin = nnx.Linear(d, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(self.lin(nnx.relu(self.ln(x))))


class ScannedStack(nnx.Module):
    """Blocks stacked with nnx.vmap (kernels [layers, d, d]), run with nnx.scan, rematerialised."""

    def __init__(self, rngs, d=32, layers=3):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(d, rngs)

        self.embed, self.blocks = nnx.Linear(64, d, rngs=rngs), blocks(rngs)
        self.out = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def run(x, block):
            return block(x)

        return self.out(run(self.embed(x.reshape(x.shape[0], -1)), self.blocks))


class HalfMLP(nnx.Module):
    def __init__(self, rngs, dtype=jnp.bfloat16):
        self.hidden = nnx.Linear(64, 128, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(128, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(128, 10, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1)))))


def nnx_zoo(make):
    """(apply_fn, params, reload) of an NNX model; reload(path) -> (apply_fn, params) of the model
    ``load_model`` rebuilds from the file."""
    apply_fn, params = gq.from_nnx(make(0))

    def reload(path):
        return gq.from_nnx(gq.load_model(path, model=make(1)))

    return apply_fn, params, reload


def linen_zoo():
    module = LinenCNN()
    init = lambda seed: module.init(jax.random.key(seed), X_TRAIN[:2], train=False)  # noqa: E731

    def reload(path):
        return gq.from_linen(module, gq.load_compressed(path).variables(init(1)))

    return *gq.from_linen(module, init(0)), reload


def equinox_zoo():
    eqx = pytest.importorskip("equinox")
    make = lambda seed: eqx.nn.MLP(64, 10, 128, 2, key=jax.random.key(seed))  # noqa: E731
    params, static = eqx.partition(make(0), eqx.is_inexact_array)
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x.reshape(x.shape[0], -1))  # noqa: E731

    def reload(path):
        like = eqx.filter(make(1), eqx.is_inexact_array)
        return apply_fn, gq.load_compressed(path).params(like)

    return apply_fn, params, reload


ZOO = {
    "nnx-batchnorm-dropout": lambda: nnx_zoo(lambda seed: NnxCNN(nnx.Rngs(seed))),
    "linen-batch-stats": linen_zoo,
    "nnx-vmap-scan-remat": lambda: nnx_zoo(lambda seed: ScannedStack(nnx.Rngs(seed))),
    "bfloat16": lambda: nnx_zoo(lambda seed: HalfMLP(nnx.Rngs(seed))),
    "float16": lambda: nnx_zoo(lambda seed: HalfMLP(nnx.Rngs(seed), jnp.float16)),
    "equinox": equinox_zoo,
}
HALF_TOLERANCE = {"bfloat16": 8 * 2**-7, "float16": 8 * 2**-10}  # 8 epsilons of the dtype


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_end_to_end(name, tmp_path):
    """pretrain -> retrain -> compress -> fine-tune -> save -> reload -> export, each model as its
    users write it: the reloaded model predicts exactly as the saved one, ONNX Runtime matches JAX
    within the model's dtype's tolerance at batch 1, 7 and 64."""
    apply_fn, params, reload = ZOO[name]()
    train = (X_TRAIN, Y_TRAIN)
    initial = jax.tree.map(np.asarray, modes.state_of(apply_fn))
    params = gq.pretrain(apply_fn, params, train, epochs=8, batch_size=32)
    if name in ("nnx-batchnorm-dropout", "linen-batch-stats"):
        moved = jax.tree.map(lambda a, b: not np.allclose(a, b), initial, apply_fn.state)
        assert all(jax.tree.leaves(moved)), "BatchNorm statistics did not update in train mode"
    assert gq.error_rate(apply_fn, params, X_TEST, Y_TEST) < 0.1
    dtypes = jax.tree.map(lambda v: v.dtype, params)
    plan = gq.make_plan(params)
    mixtures, params = gq.retrain(apply_fn, params, train, plan, epochs=6, batch_size=32)
    codebooks, snapped = gq.compress(plan, mixtures, params)
    codebooks, params = gq.finetune(apply_fn, codebooks, snapped, train, epochs=2, batch_size=32)
    assert jax.tree.map(lambda v: v.dtype, params) == dtypes  # the model's own dtypes throughout
    error = gq.error_rate(apply_fn, params, X_TEST, Y_TEST)
    assert error < 0.12

    path = tmp_path / "m.gqz"
    gq.save_compressed(path, codebooks, params, state=modes.state_of(apply_fn))
    reloaded_fn, reloaded = reload(path)
    expected = np.asarray(apply_fn(params, X_TEST), np.float32)
    np.testing.assert_array_equal(np.asarray(reloaded_fn(reloaded, X_TEST), np.float32), expected)
    assert gq.error_rate(reloaded_fn, reloaded, X_TEST, Y_TEST) == error

    gq.export_onnx(apply_fn, params, codebooks, X_TEST[:64], tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    allowed = HALF_TOLERANCE.get(name, 1e-5) * max(1.0, float(np.abs(expected).max()))
    for batch in (1, 7, 64):
        out = session.run(None, {"input": np.asarray(X_TEST[:batch], np.float32)})[0]
        np.testing.assert_allclose(out, expected[:batch], atol=allowed)


class FeatureNorm(nnx.Module):
    def __init__(self, rngs):
        self.bn = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(x.reshape(x.shape[0], -1)))


def test_batchnorm_statistics_follow_the_batches():
    """One step over the whole training set: the running statistics move by (1 - momentum) towards
    the batch's mean and (biased) variance, computed here with numpy."""
    apply_fn, params = gq.from_nnx(FeatureNorm(nnx.Rngs(0)))
    x = X_TRAIN.reshape(len(X_TRAIN), -1)
    gq.pretrain(apply_fn, params, (X_TRAIN, Y_TRAIN), epochs=1, batch_size=len(X_TRAIN))
    np.testing.assert_allclose(apply_fn.state["bn"]["mean"][...], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_fn.state["bn"]["var"][...], 0.9 + 0.1 * x.var(0), rtol=1e-5)


def test_dropout_draws_fresh_masks_from_a_resumable_stream():
    apply_fn, params = nnx_model()
    masks = [
        apply_fn.train_apply(params, apply_fn.state, X_TEST[:16], modes.step_key(0, s))[0] for s in (0, 1, 0)
    ]
    assert not np.allclose(masks[0], masks[1])  # a new mask on the next step
    np.testing.assert_array_equal(masks[0], masks[2])  # the same step draws the same mask
    assert not np.allclose(masks[0], apply_fn(params, X_TEST[:16]))  # eval mode: no dropout

    def run(epochs, **kw):
        apply_fn, params = nnx_model()
        saved = {}
        on_epoch = lambda epoch, state, metrics: saved.setdefault(epoch, state)  # noqa: E731
        params = gq.pretrain(apply_fn, params, (X_TRAIN, Y_TRAIN), epochs=epochs, batch_size=64,
                             on_epoch=on_epoch, **kw)  # fmt: skip
        return params, apply_fn.state, saved

    whole, whole_state, saved = run(2)
    resumed, resumed_state, _ = run(2, state=saved[0], start_epoch=1)
    for a, b in zip(
        jax.tree.leaves((whole, whole_state)), jax.tree.leaves((resumed, resumed_state)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    other, _, _ = run(1, seed=1)
    assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(saved[0].trainable)[0])


def test_a_stateless_apply_fn_refuses_a_model_state():
    with pytest.raises(TypeError, match="stateless"):
        modes.outputs(lambda p, x: x, {}, X_TEST[:2], {"state": {}, "rng": modes.step_key(0, 0)})


def test_a_linen_module_is_not_loaded_as_nnx(tmp_path):
    apply_fn, params = linen_model()
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    gq.save_compressed(tmp_path / "m.gqz", codebooks, snapped, state=apply_fn.state)
    with pytest.raises(TypeError, match=r"variables\(variables\)"):
        gq.load_model(tmp_path / "m.gqz", model=LinenCNN())


def test_the_budget_search_trains_a_stateful_model_in_train_mode():
    """The search runs the command line's stages: a BatchNorm model's trials train in train mode and
    the result carries the trained statistics; the user's adapter is left as it was."""
    apply_fn, params = gq.from_nnx(NnxCNN(nnx.Rngs(0)))
    params = gq.pretrain(apply_fn, params, (X_TRAIN[:384], Y_TRAIN[:384]), epochs=6, batch_size=32)
    pretrained_state = jax.tree.map(np.asarray, apply_fn.state)
    base = gq.Config(batch_size=32, retrain_epochs=3, warmup_epochs=1, finetune_epochs=1, tau=1e-2)
    val = (X_TRAIN[384:], Y_TRAIN[384:])
    result = gq.compress_to_budget(apply_fn, params, (X_TRAIN[:384], Y_TRAIN[:384]), val, budget=5.0,
                                   trials=2, base=base, progress=False)  # fmt: skip
    assert result.config is not None
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), pretrained_state, result.apply_fn.state)
    assert all(jax.tree.leaves(moved))  # retraining and fine-tuning updated the statistics
    for a, b in zip(jax.tree.leaves(pretrained_state), jax.tree.leaves(apply_fn.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert gq.error_rate(result.apply_fn, result.params, *val) == result.val_error


@pytest.mark.parametrize("dtype", [np.int32, np.complex64])
def test_a_parameter_that_is_not_floating_point_is_refused_before_training(dtype):
    params = {"k": np.zeros((64, 10), dtype), "b": np.zeros(10, np.float32)}
    apply_fn = lambda p, x: (x.reshape(x.shape[0], -1) @ p["k"]).real + p["b"]  # noqa: E731
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=f"parameter 'k' is {name}: gmm_quant trains and quantises float"):
        gq.pretrain(apply_fn, params, (X_TRAIN, Y_TRAIN), epochs=1, batch_size=32)
    with pytest.raises(TypeError, match=f"parameter 'k' is {name}"):
        gq.retrain(apply_fn, params, (X_TRAIN, Y_TRAIN), gq.make_plan(params), epochs=1, batch_size=32)
