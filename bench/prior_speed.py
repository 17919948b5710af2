"""Cost of the mixture prior: training-step time with the prior / without, side by side in one run.

    LD_PRELOAD=$(dpkg -L libtcmalloc-minimal4 | grep 'minimal.so.4$') python bench/prior_speed.py

Measures (1) seconds per step of the jitted epoch loop with and without the prior for LeNet-300-100
(batch 128 and 256) and LeNet-5-Caffe (batch 128), alternating the two variants so machine noise hits
both alike; (2) the relative error of the grid-interpolated complexity against the exact logsumexp, at
the initial mixture and at a trained-like narrow one; (3) with ``--memory``, the peak resident memory
of one value-and-gradient of the prior over 100M float32 weights, beyond the weights themselves
(measured in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.core import mixture as mx
from gmm_quant.training import loop


def _setup(model_name, batch, steps, with_prior):
    graphdef, params = nnx.split(models.create(model_name), nnx.Param)

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch * steps, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch * steps), jnp.int32)
    task = gq.cross_entropy(apply)
    if with_prior:
        plan = gq.make_plan(params)
        loss = gq.joint_loss(task, plan, 5e-3, 60000)
        trainable = {"params": params, "mixtures": gq.init_mixtures(plan, params)}
        opt = gq.joint_optimizer()
    else:
        import optax

        def loss(p, x, y, step):
            return task(p, x, y)

        trainable, opt = params, optax.adam(5e-4)
    epoch = loop.make_epoch(loss, opt, batch)
    state = loop.init_state(trainable, opt)
    return epoch, state, x, y


def step_times(model_name, batch, steps, repeats):
    """Median seconds per step, without and with the prior, runs interleaved."""
    runs = {flag: _setup(model_name, batch, steps, flag) for flag in (False, True)}
    times = {False: [], True: []}
    for epoch, state, x, y in runs.values():  # compile and warm up
        jax.block_until_ready(epoch(state, x, y, loop.epoch_key(0, 0)))
    for r in range(repeats):
        for flag, (epoch, state, x, y) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(epoch(state, x, y, loop.epoch_key(0, r)))
            times[flag].append((time.perf_counter() - start) / steps)
    return float(np.median(times[False])), float(np.median(times[True]))


def accuracy_check():
    """Relative error of the fast complexity vs the exact one on LeNet-300-100-sized weights."""
    rng = np.random.default_rng(0)
    w = {"w": jnp.asarray(rng.laplace(0, 0.03, 266200), jnp.float32)}
    cfg = mx.MixtureConfig()
    init = mx.init_mixture(cfg, w)
    trained = init._replace(
        means=init.means * 0.5,
        log_precisions=jnp.full_like(init.log_precisions, 2 * np.log(1 / 0.003)),
    )
    # pull weights onto the narrow components, as after retraining
    centres = np.asarray(mx.component_means(trained))
    snapped = centres[gq.snap(np.asarray(w["w"]), centres)] + rng.normal(0, 0.002, 266200)
    cases = {"initial mixture": (init, w), "trained-like mixture": (trained, {"w": jnp.asarray(snapped)})}
    out = {}
    for name, (state, weights) in cases.items():
        fast = float(mx.complexity(cfg, state, weights))
        exact = float(-(mx.log_prob(cfg, state, weights, exact=True) + mx.hyper_log_prob(cfg, state)))
        out[name] = abs(fast - exact) / abs(exact)
    return out


def memory_child(n):
    """Run in a subprocess: peak RSS of one value-and-grad over n weights, minus the weights' RSS."""
    w = jnp.ones((n,), jnp.float32) * 0.01
    w = w.at[::7].set(-0.2)
    jax.block_until_ready(w)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = mx.MixtureConfig()
    state = mx.init_mixture(cfg, init_range=(-0.2, 0.2))
    fn = jax.jit(jax.value_and_grad(lambda w: mx.complexity(cfg, state, w)))
    _value, _grad = jax.block_until_ready(fn(w))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"weights_mb": n * 4 / 2**20, "base_mb": base / 1024, "peak_mb": peak / 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="steps per timed epoch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="also measure 100M-weight peak memory")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    print("| model | batch | plain ms/step | with prior ms/step | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for model_name, batch in [("lenet300_100", 128), ("lenet300_100", 256), ("lenet5_caffe", 128)]:
        plain, prior = step_times(model_name, batch, args.steps, args.repeats)
        print(f"| {model_name} | {batch} | {plain * 1e3:.3f} | {prior * 1e3:.3f} | {prior / plain:.2f}x |")
    for name, err in accuracy_check().items():
        print(f"complexity relative error vs exact ({name}): {err:.2e}")
    if args.memory:
        cmd = [sys.executable, __file__, "--memory-child", str(100_000_000)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        extra = out["peak_mb"] - out["base_mb"]
        print(f"100M weights ({out['weights_mb']:.0f} MB): peak RSS beyond the weights {extra:.0f} MB")


if __name__ == "__main__":
    main()
