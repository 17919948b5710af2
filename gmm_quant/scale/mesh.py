"""``--mesh data=4`` / ``data=2,model=2``: the device mesh a run trains on.

Two axis names: ``data`` (the batch is split over it) and ``model`` (parameters matched by
``shard_params`` are split over it). Axes are ``Auto``: XLA's partitioner places everything a rule
does not pin down, so the user's model code needs no sharding annotations.
"""

from __future__ import annotations

import math

import jax

AXES = ("data", "model")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=2"`` -> ``{"data": 2, "model": 2}``; ``""`` -> ``{}`` (one device, no mesh).
    Raises ValueError naming what is wrong."""
    axes: dict[str, int] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, size = item.partition("=")
        if not sep or name not in AXES:
            raise ValueError(f"mesh item {item!r}: expected AXIS=SIZE with AXIS one of {AXES}")
        if name in axes:
            raise ValueError(f"mesh axis {name!r} given twice")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh axis {name!r}: size {size!r} is not a positive integer")
        axes[name] = int(size)
    return axes


def make_mesh(axes: dict[str, int]) -> jax.sharding.Mesh | None:
    """The mesh of ``axes`` over the first devices of every process (None for ``{}``)."""
    if not axes:
        return None
    need, have = math.prod(axes.values()), jax.device_count()
    if need > have:
        raise ValueError(
            f"mesh {format_mesh(axes)} needs {need} devices but JAX sees {have} "
            "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    if jax.process_count() > 1 and need != have:
        raise ValueError(
            f"a mesh over several processes must use all {have} devices; {format_mesh(axes)} uses {need}"
        )
    names = tuple(axes)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(axes.values()), names, axis_types=auto, devices=jax.devices()[:need])


def batch_problem(axes: dict[str, int], batch_size: int) -> str | None:
    """Why ``batch_size`` cannot be split over the ``data`` axis of ``axes``, or None."""
    data = axes.get("data", 1)
    return f"not a multiple of the mesh's data axis ({data})" if batch_size % data else None


def format_mesh(axes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in axes.items())
