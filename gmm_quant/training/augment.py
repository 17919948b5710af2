"""Data augmentation for pretraining: random translations of image batches.

``shift(x, key, max_shift)`` moves every image of an ``[N, H, W, C]`` batch by its own random offset
of up to ``max_shift`` pixels along each axis, filling with zeros (MNIST's background). Pure JAX:
it runs inside the jitted training step, keyed by the step number, so a resumed run sees the same
shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift(x, key, max_shift: int):
    """Each image of ``x`` ([N, H, W, C]) translated by an offset in [-max_shift, max_shift]^2."""
    if max_shift <= 0:
        return x
    n, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def shifted_loss(task_loss, max_shift: int, seed: int = 0):
    """``task_loss(params, x, y)`` on a randomly shifted batch; ``(params, x, y, step)`` signature."""
    base = jax.random.PRNGKey(seed)

    def loss(params, x, y, step=None, **mode):
        key = jax.random.fold_in(base, 0 if step is None else step)
        return task_loss(params, shift(x, key, max_shift), y, **mode)

    return loss
