"""Scale: the prior over 100M and 1B weights sharded over 8 host devices, and a ~100M-parameter step.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/scale.py

(1) One jitted value-and-gradient of the prior (17 components) over one weight matrix: 134M (2^27)
weights on 1 device, 134M and 1.07B (2^30) split over ``model=8`` host devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``). Each runs in a fresh subprocess; compiled first, then
the peak resident memory is reset (``/proc/self/clear_refs``) and measured over the first call: the
prior's extra memory is that peak minus the resident set before the call minus the gradient (XLA's
own plan of the scratch, ``memory_analysis``, is printed beside). Time: median of 3 further calls.

(2) A training step of a wide MLP (1024-8192-8192-2048-10, 92M parameters, batch 64 and 512, Adam)
with the prior on every kernel vs without, alternated in one process, median ratio; each timing is 4
consecutive steps divided by 4 (one whole cycle of ``mixture_every=4``: three steps with the mixture
frozen and one that updates it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    """kB of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def prior_child(n_log2: int, devices: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gmm_quant.core import mixture as mx
    from gmm_quant.scale.mesh import make_mesh

    shape = (2 ** (n_log2 - 12), 4096)
    cfg = mx.MixtureConfig()
    mesh = make_mesh({"model": devices})
    spec = P("model", None)
    sharding = NamedSharding(mesh, spec)

    def block(index):  # each device's rows, generated on the host one block at a time
        start, stop, _ = index[0].indices(shape[0])
        rng = np.random.default_rng(start)
        out = rng.standard_normal((stop - start, 4096), np.float32)
        out *= 0.05
        return out

    w = jax.make_array_from_callback(shape, sharding, block)
    state = mx.init_mixture(cfg, init_range=(-0.2, 0.2))
    with jax.set_mesh(mesh):
        fn = jax.jit(
            jax.value_and_grad(lambda s, w: mx.log_prob(cfg, s, [w], specs=[spec]), argnums=(0, 1)),
            out_shardings=(None, (None, sharding)),
        )
        compiled = fn.lower(state, w).compile()
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
        before = _status("VmRSS")
        value, grads = jax.block_until_ready(compiled(state, w))  # memory: the first call alone (a later
        peak = _status("VmHWM")  # one may meet the previous gradient not yet released by the runtime)
        del grads
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, w))
            times.append(time.perf_counter() - start)
    weights = int(np.prod(shape)) * 4
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20  # XLA's own plan, per device
    return {"weights": int(np.prod(shape)), "devices": devices, "seconds": float(np.median(times)),
            "weights_mb": weights / 2**20, "extra_mb": (peak - before - weights) / 2**20,
            "temp_mb": temp, "value_finite": bool(jnp.isfinite(value))}  # fmt: skip


def step_child(repeats: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import gmm_quant as gq
    from gmm_quant.training import loop

    sizes = (1024, 8192, 8192, 2048, 10)
    rng = np.random.default_rng(0)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        kernel = jnp.asarray(rng.normal(size=(a, b)).astype(np.float32) / np.sqrt(a))
        params[f"l{i}"] = {"kernel": kernel, "bias": jnp.zeros((b,), jnp.float32)}

    def apply(p, x):
        for i in range(len(sizes) - 1):
            x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            x = jax.nn.relu(x) if i < len(sizes) - 2 else x
        return x

    x = jnp.asarray(rng.normal(size=(batch, 1024)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    plan = gq.make_plan(params)
    plain = gq.cross_entropy(apply)
    variants = {
        "plain": (lambda t, x, y, s: plain(t, x, y), optax.adam(1e-4), params),
        "prior": (gq.joint_loss(plain, plan, 0.05, 60000), gq.joint_optimizer(),
                  {"params": params, "mixtures": gq.init_mixtures(plan, params)}),
        "every4": (gq.joint_loss(plain, plan, 0.05, 60000, mixture_every=4),
                   gq.joint_optimizer(mixture_every=4),
                   {"params": params, "mixtures": gq.init_mixtures(plan, params)}),
    }  # fmt: skip
    steps, states = {}, {}
    for name, (loss, opt, trainable) in variants.items():
        epoch = loop.make_epoch(loss, opt, batch, scan=False)
        states[name] = (epoch, loop.init_state(trainable, opt))
    times = {name: [] for name in variants}
    x4, y4 = jnp.tile(x, (4, 1)), jnp.tile(y, 4)  # 4 steps per timing: one whole every-4 cycle
    for r in range(repeats + 1):  # the first round compiles
        for name, (epoch, state) in states.items():
            start = time.perf_counter()
            state, _ = epoch(state, x4, y4, loop.epoch_key(0, r))
            jax.block_until_ready(state)
            if r:
                times[name].append((time.perf_counter() - start) / 4)
            states[name] = (epoch, state)
    steps = {k: float(np.median(v)) for k, v in times.items()}
    count = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    return {"parameters": count, **steps, "ratio": steps["prior"] / steps["plain"],
            "ratio_every4": steps["every4"] / steps["plain"]}  # fmt: skip


def _child(args: list[str], devices: int) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=False)  # fmt: skip
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--steps-only", action="store_true", help="only the training-step table")
    ap.add_argument("--prior-only", action="store_true", help="only the prior's time and memory table")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = (
            prior_child(int(rest[0]), int(rest[1]))
            if kind == "prior"
            else step_child(int(rest[0]), int(rest[1]))
        )
        print(json.dumps(out))
        return
    runs = (
        []
        if args.steps_only
        else [("prior", 27, 1), ("prior", 27, 8)] + ([] if args.skip_1b else [("prior", 30, 8)])
    )
    for kind, n_log2, devices in runs:
        r = _child([kind, str(n_log2), str(devices)], devices)
        share = 100 * r["extra_mb"] / r["weights_mb"]
        print(f"prior over {r['weights']:,} weights on {devices} device(s): {r['seconds']:.2f} s per "
              f"value-and-grad; extra memory {r['extra_mb']:.0f} MB = {share:.1f}% of the weights "
              f"({r['extra_mb'] / devices:.0f} MB per device; XLA's planned scratch {r['temp_mb']:.0f} MB "
              "per device)", flush=True)  # fmt: skip
    for batch in () if args.prior_only else (64, 512):
        r = _child(["step", str(args.repeats), str(batch)], 1)
        ms = f"plain {1000 * r['plain']:.0f} ms, with the prior {1000 * r['prior']:.0f} ms"
        ms += f" ({r['ratio']:.2f}x), mixture every 4 steps {1000 * r['every4']:.0f} ms"
        ms += f" ({r['ratio_every4']:.2f}x)"
        print(f"training step, {r['parameters']:,} parameters, batch {batch}: {ms}", flush=True)


if __name__ == "__main__":
    main()
