"""Pretraining augmentation and schedule: shifts move each image exactly; the schedule decays."""

import jax
import numpy as np
import optax
import pytest

from gmm_quant.training import augment, pipeline


def test_each_image_moves_by_its_own_offset_with_zero_fill():
    x = np.arange(2 * 5 * 6 * 1, dtype=np.float32).reshape(2, 5, 6, 1) + 1
    key = jax.random.PRNGKey(3)
    out = np.asarray(augment.shift(x, key, 2))
    offsets = np.asarray(jax.random.randint(key, (2, 2), 0, 5)) - 2  # what shift draws: the pad offset
    for image, moved, (dy, dx) in zip(x, out, offsets, strict=True):
        expected = np.zeros_like(
            image
        )  # by hand: pixel (i, j) of the output is (i + dy, j + dx) of the input
        for i in range(5):
            for j in range(6):
                if 0 <= i + dy < 5 and 0 <= j + dx < 6:
                    expected[i, j] = image[i + dy, j + dx]
        np.testing.assert_array_equal(moved, expected)
    assert np.array_equal(augment.shift(x, key, 0), x)


def test_cosine_pretraining_ends_at_learning_rate_zero():
    apply_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]  # noqa: E731
    params = {"w": np.zeros((4, 3), np.float32)}
    _, opt, _ = pipeline.pretrain_setup(apply_fn, params, learning_rate=0.1, total_steps=10)
    state = opt.init(params)
    grads = {"w": np.ones((4, 3), np.float32)}
    steps = []
    for _ in range(11):
        updates, state = opt.update(grads, state, params)
        steps.append(float(np.abs(updates["w"]).max()))
    assert steps[0] == pytest.approx(0.1, rel=1e-3) and steps[-1] == pytest.approx(0.0, abs=1e-9)
    schedule = optax.cosine_decay_schedule(0.1, 10)
    assert steps[5] == pytest.approx(float(schedule(5)), rel=1e-3)
