"""A small, fast training loop shared by pretraining, retraining and fine-tuning.

One jitted call runs a whole epoch as a ``lax.scan`` over mini-batches (the fastest formulation on
CPU), with the permutation derived from ``(seed, epoch)`` so that a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gmm_quant._util import interrupts
from gmm_quant._util.partials import arguments, bound
from gmm_quant.training import convs, modes


class TrainState(NamedTuple):
    """``model_state``: the state of a model trained in train mode (``modes.Stateful``), else None."""

    step: jax.Array
    trainable: object
    opt_state: object
    model_state: object = None


def init_state(trainable, optimizer: optax.GradientTransformation, model_state=None) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), model_state)


def make_epoch(loss_fn, optimizer: optax.GradientTransformation, batch_size: int, scan: bool | None = None,
               batch_sharding=None, state_sharding=None, seed: int = 0,
               matmul_convs: bool | None = None):  # fmt: skip
    """``epoch(state, x, y, key) -> (state, metrics)``: one pass over (x, y) in shuffled batches.

    ``loss_fn(trainable, x, y, step) -> (loss, aux)``; ``metrics`` averages loss and aux over the
    epoch's batches. The last incomplete batch is dropped. When the state carries a ``model_state``
    the loss is called with ``state=model_state, rng=modes.step_key(seed, step)`` as well and returns
    the model's new state as ``aux["state"]``, carried to the next step.

    ``scan=True`` runs the epoch as one ``lax.scan`` (fastest: 0.56 vs 0.70 ms per LeNet-300-100
    step, 42 vs 51 ms per im2col LeNet-5 step); ``False`` loops over a jitted step in Python, which a
    loss with an XLA convolution left needs: XLA on CPU runs convolutions inside a scan about 9x slower
    (807 vs 88 ms per LeNet-5 step). ``None`` picks scan unless the (rewritten) loss holds a convolution.

    ``matmul_convs`` (default: on the CPU backend) computes the loss's convolutions as im2col matrix
    products and its tiling max-pools as reshapes (``convs.as_matmuls``): LeNet-5-Caffe steps 2.0x ->
    1.1x PyTorch's (BENCHMARKS.md, "Training speed against PyTorch").
    """
    if matmul_convs is None:
        matmul_convs = convs.enabled()
    rewrite = lambda f: f  # noqa: E731  (convs.as_matmuls once the first epoch finds something to rewrite)
    decided = False

    def train_step(state: TrainState, batch, arrays):
        x, y = batch
        if batch_sharding is not None:
            x, y = (jax.lax.with_sharding_constraint(v, batch_sharding) for v in (x, y))
        grad_fn = jax.value_and_grad(rewrite(bound(loss_fn, arrays)), has_aux=True)
        mode = {}
        if state.model_state is not None:
            mode = {"state": state.model_state, "rng": modes.step_key(seed, state.step)}
        (loss, aux), grads = grad_fn(state.trainable, x, y, state.step, **mode)
        aux = dict(aux)
        model_state = aux.pop("state", state.model_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = TrainState(state.step + 1, trainable, opt_state, model_state)
        if state_sharding is not None:
            new = jax.lax.with_sharding_constraint(new, state_sharding)
        return new, {"loss": loss, **aux}

    def batches(x, key):
        steps = x.shape[0] // batch_size
        if steps == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0]} training examples")
        return jax.random.permutation(key, x.shape[0])[: steps * batch_size].reshape(steps, batch_size)

    @jax.jit
    def scan_epoch(state: TrainState, x, y, key, arrays):
        order = batches(x, key)
        state, metrics = jax.lax.scan(lambda s, idx: train_step(s, (x[idx], y[idx]), arrays), state, order)
        if state_sharding is not None:
            state = jax.lax.with_sharding_constraint(state, state_sharding)
        return state, jax.tree.map(jnp.mean, metrics)

    jit_step = jax.jit(lambda state, x, y, idx, arrays: train_step(state, (x[idx], y[idx]), arrays))
    arrays = arguments(loss_fn)

    def loop_epoch(state: TrainState, x, y, key):
        history = []
        for idx in batches(x, key):
            state, metrics = jit_step(state, x, y, idx, arrays)
            history.append(metrics)
            interrupts.check()  # a Ctrl-C dropped inside a garbage-collector callback stops here
        return state, jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *history)

    def decide(state: TrainState, x, y) -> None:
        """Before anything is compiled: rewrite the loss's convolutions (only if it has any, so a dense
        loss is traced once), then pick scan unless an XLA convolution is left."""
        nonlocal scan, rewrite, decided
        mode = (
            {} if state.model_state is None else {"state": state.model_state, "rng": modes.step_key(seed, 0)}
        )
        args = (arrays, mode, state.trainable, x[:batch_size], y[:batch_size], state.step)
        jaxpr = jax.make_jaxpr(lambda a, m, *v: bound(loss_fn, a)(*v, **m))(*args)  # the state traced:
        if matmul_convs and convs.has_rewrites(jaxpr.jaxpr):  # a model writes its statistics into it
            rewrite = convs.as_matmuls
            jaxpr = jax.make_jaxpr(lambda a, m, *v: rewrite(bound(loss_fn, a))(*v, **m))(*args)
        if scan is None:
            scan = "conv_general_dilated" not in str(jaxpr)
        decided = True

    def epoch(state: TrainState, x, y, key):
        if not decided:
            decide(state, x, y)
        return scan_epoch(state, x, y, key, arrays) if scan else loop_epoch(state, x, y, key)

    return epoch


def epoch_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), epoch)


def check_finite(metrics: dict, where: str) -> dict:
    """Host-side metrics; raises FloatingPointError naming ``where`` if any is NaN or infinite."""
    out = {k: float(v) for k, v in metrics.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"training diverged in {where}: non-finite {', '.join(bad)}")
    return out


def mean_loss(loss_fn, trainable, x, y, batch_size: int = 1000) -> float:
    """Example-weighted mean of ``loss_fn(trainable, x_batch, y_batch, 0)[0]`` over all of ``x``."""
    fn = jax.jit(lambda a, t, xb, yb: bound(loss_fn, a)(t, xb, yb, jnp.zeros((), jnp.int32))[0])
    arrays, total = arguments(loss_fn), 0.0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        total += float(fn(arrays, trainable, xb, yb)) * xb.shape[0]
    return total / x.shape[0]


def predict(apply_fn, params, x, batch_size: int = 1000):
    """Concatenated ``apply_fn(params, x_batch)`` over ``x`` in batches."""
    fn = modes.compiled(apply_fn)
    outs = [fn(params, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return jnp.concatenate(outs)


def error_rate(apply_fn, params, x, y, batch_size: int = 1000) -> float:
    """Fraction of labels (examples, or tokens of sequences) the argmax prediction gets wrong."""
    return _error(predict(apply_fn, params, x, batch_size), y)


def perplexity(apply_fn, params, x, y, batch_size: int = 1000) -> float:
    """``exp`` of the mean cross-entropy (nats) over every label: for a language model's ``[N, L]``
    next-token labels, the per-token perplexity."""
    return _perplexity(predict(apply_fn, params, x, batch_size), y)


def rmse(apply_fn, params, x, y, batch_size: int = 1000) -> float:
    """Root mean squared error of a regression model's outputs (shaped as ``y``, or ``y`` with a
    trailing axis of 1) over every target value."""
    out = predict(apply_fn, params, x, batch_size)
    return math.sqrt(float(jnp.mean((out.reshape(jnp.shape(y)) - y) ** 2)))


def error_and_perplexity(apply_fn, params, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """Both, from one pass over ``x``."""
    logits = predict(apply_fn, params, x, batch_size)
    return _error(logits, y), _perplexity(logits, y)


def _error(logits, y) -> float:
    return float(jnp.mean(jnp.argmax(logits, -1) != y))


def _perplexity(logits, y) -> float:
    return math.exp(float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()))
