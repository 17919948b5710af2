"""One training step, JAX (this library's loop) against PyTorch on CPU, side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/step_speed.py
    python bench/step_speed.py --models lenet5_caffe --batches 128 --repeats 5   # one cell

The same network (LeNet-5-Caffe, LeNet-300-100), the same Adam step on the same random batch shapes;
JAX runs ``training.loop.make_epoch`` as the stages do (convolutions as im2col products on CPU, the
epoch as one ``lax.scan``; ``--xla-convs`` for XLA's own convolutions in a Python loop, as before) and
PyTorch a plain ``zero_grad / backward / step`` loop with ``torch.set_num_threads`` = the cores.
Repeats alternate JAX and PyTorch so that machine noise hits both; medians are reported, with the
JAX/PyTorch ratio and each step's achieved FLOP/s (XLA's cost analysis of the JAX step) against this
machine's measured float32 matmul peak (a 2048x2048 product in numpy/JAX). PyTorch is optional
(``pip install torch`` or the ``bench`` extra); without it only the JAX side is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.training import loop

SHAPES = {"lenet5_caffe": (28, 28, 1), "lenet300_100": (784,)}


def jax_epoch(name, batch, steps, xla_convs):
    graphdef, params = nnx.split(models.create(name), nnx.Param)
    apply = lambda p, x: nnx.merge(graphdef, p)(x.reshape(x.shape[0], *SHAPES[name]))  # noqa: E731
    task = gq.cross_entropy(apply)
    optimizer = optax.adam(1e-3)
    epoch = loop.make_epoch(lambda p, x, y, step=None: task(p, x, y), optimizer, batch,
                            matmul_convs=not xla_convs, scan=False if xla_convs else None)  # fmt: skip
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch * steps, *SHAPES[name])), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch * steps), jnp.int32)
    state = loop.init_state(params, optimizer)

    def run(r):
        out, _ = epoch(state, x, y, loop.epoch_key(0, r))
        jax.block_until_ready(out)

    return run


def step_flops(name, batch, xla_convs) -> float:
    """XLA's count of one training step's floating-point operations."""
    graphdef, params = nnx.split(models.create(name), nnx.Param)
    apply = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    x = jnp.zeros((batch, *SHAPES[name]), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    from gmm_quant.training import convs

    fn = jax.grad(loss if xla_convs else convs.as_matmuls(loss))
    analysis = jax.jit(fn).lower(params).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", float("nan")))


def torch_epoch(name, batch, steps):
    import torch
    from torch import nn

    torch.set_num_threads(os.cpu_count() or 1)
    if name == "lenet5_caffe":
        net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))  # fmt: skip
        shape = (1, 28, 28)
    else:
        net = nn.Sequential(
            nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )
        shape = (784,)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch * steps, *shape)
    y = torch.randint(0, 10, (batch * steps,))
    loss_fn = nn.CrossEntropyLoss()

    def run(_r):
        for i in range(steps):
            optimizer.zero_grad()
            loss_fn(net(x[i * batch : (i + 1) * batch]), y[i * batch : (i + 1) * batch]).backward()
            optimizer.step()

    return run


def matmul_peak(n=2048, repeats=5) -> float:
    """FLOP/s of this machine's best float32 matrix product (JAX on all cores)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cell(name, batch, steps, repeats, xla_convs, have_torch) -> dict:
    runners = {"jax": jax_epoch(name, batch, steps, xla_convs)}
    if have_torch:
        runners["torch"] = torch_epoch(name, batch, steps)
    for run in runners.values():
        run(0)  # compile / warm up
    times = {k: [] for k in runners}
    for r in range(repeats):
        for k, run in runners.items():
            times[k].append(_timed(lambda run=run, r=r: run(r + 1)) / steps)
    out = {f"{k}_ms": 1000 * float(np.median(v)) for k, v in times.items()}
    if have_torch:
        out["jax/torch"] = out["jax_ms"] / out["torch_ms"]
    out["gflops_per_step"] = step_flops(name, batch, xla_convs) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5_caffe,lenet300_100", help="comma-separated model names")
    ap.add_argument("--batches", default="64,128,256", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    ap.add_argument("--repeats", type=int, default=5, help="alternating repeats per cell (median)")
    ap.add_argument("--xla-convs", action="store_true", help="XLA's own convolutions (the old path)")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    peak = matmul_peak()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32, 2048^3, {os.cpu_count()} cores)")
    rows = []
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            measured = cell(name, batch, args.steps, args.repeats, args.xla_convs, have_torch)
            row = {"model": name, "batch": batch, **measured}
            row["fraction_of_peak"] = row["gflops_per_step"] * 1e9 / (row["jax_ms"] / 1000) / peak
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
