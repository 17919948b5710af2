"""Teacher distillation (issue 15, part 2): off is exactly off, the gradient is right, the CLI uses it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmm_quant as gq
from gmm_quant import train


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
