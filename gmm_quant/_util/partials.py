"""Losses as ``jax.tree_util.Partial``: the arrays a loss carries reach ``jax.jit`` as arguments."""

from __future__ import annotations

import jax


def arguments(loss_fn):
    """What the loops pass to ``jax.jit`` for ``loss_fn``: the loss itself when it is a
    ``jax.tree_util.Partial`` (a pytree: its arrays become arguments), else None (closed over).

    A loss that needs arrays besides the trainable state (fine-tuning's codebook indices, a teacher)
    is a ``Partial`` over them. Closed over, they would be baked into the program as constants, which
    JAX refuses for arrays spread over several processes.
    """
    return loss_fn if isinstance(loss_fn, jax.tree_util.Partial) else None


def carrying(fn, *inner):
    """``fn`` with ``inner`` (a loss it wraps, arrays) bound as its leading arguments, as a
    ``jax.tree_util.Partial``: whatever arrays they carry reach jit as arguments (``arguments``)."""
    wrapped = (i if isinstance(i, jax.tree_util.Partial) or not callable(i) else jax.tree_util.Partial(i)
               for i in inner)  # fmt: skip
    return jax.tree_util.Partial(fn, *wrapped)


def bound(loss_fn, passed):
    """The loss to call inside a jit given its ``arguments`` value ``passed``."""
    return loss_fn if passed is None else passed
