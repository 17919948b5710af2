"""Half-precision parameters train through float32 master weights.

A model whose parameters are bfloat16 or float16 is trained on float32 copies of them (the master
weights: Adam's moments and its epsilon of 1e-8 underflow in float16, and the prior's small pulls vanish
in bfloat16's 8-bit mantissa); the task loss sees them cast back to the model's own dtypes, so the
model computes exactly as it will run, and the gradient passes the cast unchanged. The stages return
parameters in the model's dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmm_quant.core.rules import flatten

_HALF = (jnp.bfloat16, jnp.float16)


def is_half(leaf) -> bool:
    return hasattr(leaf, "dtype") and any(jnp.dtype(leaf.dtype) == jnp.dtype(h) for h in _HALF)


def check_dtypes(params) -> None:
    """Refuse, in one line naming the leaf, a parameter that is not floating point (an integer or
    complex leaf cannot carry a gradient, a prior or a codebook): before anything trains."""
    for path, leaf in flatten(params).items():
        dtype = jnp.dtype(getattr(leaf, "dtype", jnp.float32))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"parameter {path!r} is {dtype.name}: gmm_quant trains and quantises floating-point "
                "parameters (float32, bfloat16, float16); keep other leaves out of params (model state)"
            )


def master(params):
    """``params`` with every half-precision leaf as float32 (other leaves as they are)."""
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32) if is_half(v) else v, params)


def like(tree, reference):
    """``tree`` with each leaf cast to the dtype of ``reference``'s leaf (same structure)."""
    return jax.tree.map(lambda v, r: jnp.asarray(v, r.dtype) if is_half(r) else v, tree, reference)


def in_model_dtypes(task_loss, reference):
    """``task_loss`` over master weights: its params cast to ``reference``'s dtypes first. Returns
    ``task_loss`` itself when ``reference`` holds no half-precision leaf."""
    if not any(is_half(v) for v in jax.tree.leaves(reference)):
        return task_loss
    dtypes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), v.dtype), reference)

    def loss(params, x, y, **mode):
        return task_loss(like(params, dtypes), x, y, **mode)

    return loss
