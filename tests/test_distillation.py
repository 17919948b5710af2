"""Teacher distillation (issue 15, part 2): off is exactly off, the gradient is right, the CLI uses it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmm_quant as gq
from gmm_quant.cli import train


def _linear():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    teacher = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    student = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    return (lambda p, x: x @ p["w"]), teacher, student, x, y


def test_alpha_zero_is_plain_cross_entropy_bit_for_bit():
    apply_fn, teacher, student, x, y = _linear()
    plain = gq.pretrain(apply_fn, student, (x, y), epochs=3, batch_size=8)
    distilled = gq.pretrain(
        apply_fn, student, (x, y), epochs=3, batch_size=8,
        task_loss=gq.distillation_loss(apply_fn, teacher, alpha=0.0),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(plain["w"]), np.asarray(distilled["w"]))


def test_distillation_term_matches_its_definition_and_a_finite_difference():
    apply_fn, teacher, student, x, y = _linear()
    alpha, t = 0.7, 3.0
    loss = gq.distillation_loss(apply_fn, teacher, alpha=alpha, temperature=t)
    value, aux = loss(student, x, y)
    pt = jax.nn.softmax(np.asarray(x @ teacher["w"]) / t)
    ps = jax.nn.softmax(np.asarray(x @ student["w"]) / t)
    kl = float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)))
    ce = float(gq.cross_entropy(apply_fn)(student, x, y)[0])
    assert float(aux["distill_kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(value) == pytest.approx(ce + alpha * t**2 * kl, rel=1e-5)
    with jax.enable_x64(True):
        student64 = {"w": jnp.asarray(student["w"], jnp.float64)}
        teacher64 = {"w": jnp.asarray(teacher["w"], jnp.float64)}
        x64 = jnp.asarray(x, jnp.float64)
        loss64 = gq.distillation_loss(apply_fn, teacher64, alpha=alpha, temperature=t)
        grad = jax.grad(lambda p: loss64(p, x64, y)[0])(student64)["w"]
        eps, w = 1e-6, np.asarray(student64["w"])
        for i, j in [(0, 0), (2, 1), (4, 2)]:
            up, down = w.copy(), w.copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric = (float(loss64({"w": up}, x64, y)[0]) - float(loss64({"w": down}, x64, y)[0])) / (
                2 * eps
            )
            assert float(grad[i, j]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_command_line_distils_and_refuses_bad_values(tmp_path, capsys):
    argv = ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress", "--no-onnx"]
    assert train.main([*argv, "--distill-alpha", "0.5", "--distill-temperature", "2"]) == 0
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["error_finetuned"] < 0.2
    capsys.readouterr()
    assert train.main([*argv[:3], str(tmp_path / "x"), "--distill-temperature", "0"]) == 2
    assert "'distill_temperature' = 0.0: must be > 0" in capsys.readouterr().err


def _mlp(seed):
    from flax import nnx

    import models

    return nnx.split(models.create("digits_mlp", seed), nnx.Param)


def test_feature_maps_are_the_layer_outputs_computed_by_hand():
    graphdef, params = _mlp(0)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 1)).astype(np.float32)
    logits, maps = gq.feature_maps(graphdef, r"layers/0$")(params, jnp.asarray(x))
    w, b = np.asarray(params["layers"][0]["kernel"]), np.asarray(params["layers"][0]["bias"])
    assert list(maps) == ["layers/0"]
    np.testing.assert_allclose(np.asarray(maps["layers/0"]), x.reshape(4, -1) @ w + b, rtol=1e-5, atol=1e-5)
    assert logits.shape == (4, 10)
    with pytest.raises(ValueError, match="no module path matches 'conv'"):
        gq.feature_maps(graphdef, "conv")(params, jnp.asarray(x))


def _f64(params):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


def test_feature_term_matches_its_definition_and_a_finite_difference():
    graphdef, student = _mlp(0)
    teacher = _mlp(1)[1]
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 8, 8, 1)), rng.integers(0, 10, 16).astype(np.int32)
    with jax.enable_x64(True):
        student, teacher = (
            jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p) for p in (student, teacher)
        )
        x = jnp.asarray(x, jnp.float64)
        apply_fn = gq.feature_maps(graphdef, "layers/[01]$")
        loss = gq.distillation_loss(None, teacher, alpha=0.0, features=apply_fn, beta=0.3)
        value, aux = loss(student, x, y)

        def hidden(p, i):  # the MLP by hand: flatten, Linear, relu, Linear, ...
            h = np.asarray(x).reshape(16, -1)
            for j in range(i + 1):
                h = h if j == 0 else np.maximum(h, 0)
                h = h @ np.asarray(p["layers"][j]["kernel"]) + np.asarray(p["layers"][j]["bias"])
            return h

        rel = [
            np.sum((hidden(student, i) - hidden(teacher, i)) ** 2) / np.sum(hidden(teacher, i) ** 2)
            for i in (0, 1)
        ]
        ce = float(gq.cross_entropy(lambda p, x: apply_fn(p, x)[0])(student, x, y)[0])
        assert float(aux["distill_features"]) == pytest.approx(np.mean(rel), rel=1e-9)
        assert float(value) == pytest.approx(ce + 0.3 * np.mean(rel), rel=1e-9)
        grad = jax.grad(lambda p: loss(p, x, y)[0])(student)["layers"][0]["kernel"]
        w = np.asarray(student["layers"][0]["kernel"])
        for i, j in [(0, 0), (10, 3), (63, 7)]:
            moved = []
            for step in (1e-6, -1e-6):
                k = w.copy()
                k[i, j] += step
                p = jax.tree.map(lambda a: a, student)
                p["layers"][0]["kernel"] = jnp.asarray(k)
                moved.append(float(loss(p, x, y)[0]))
            assert float(grad[i, j]) == pytest.approx((moved[0] - moved[1]) / 2e-6, rel=1e-5, abs=1e-9)


def test_command_line_distils_feature_maps_and_refuses_a_pattern_matching_nothing(tmp_path, capsys):
    argv = ["--config", "tiny", "--no-progress", "--no-onnx", "--distill-alpha", "0"]
    assert train.main([*argv, "--workdir", str(tmp_path / "w"), "--distill-features", "layers/[01]$"]) == 0
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["error_finetuned"] < 0.2
    capsys.readouterr()
    assert train.main([*argv, "--workdir", str(tmp_path / "x"), "--distill-features", "conv"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'distill_features' = 'conv': matches no module path" in err[0]
    assert not (tmp_path / "x").exists()
