"""Compression of a sharded layer where its shards live: nearest-centre counts, snapping, Han count.

A layer sharded over a mesh (a ``jax.Array`` whose ``NamedSharding`` splits one dimension) is never
gathered onto one host or device to be compressed. Each device works on its own block inside
``jax.shard_map`` and only small results cross devices:

* ``member_counts``: per centre, how many weights are nearest to it (one psum of ``k`` counts);
* ``snap``: the index of every weight's nearest centre, computed elementwise and left sharded like
  the weights (same tie rule as ``codebook.snap``: bit-identical indices);
* ``layer_cost``: Han et al.'s count (``han.cost_from_counts``) from per-device histograms of the
  codebook indices and of the gaps between non-zeros in Caffe's order. A gap that crosses a block
  boundary is completed from each contiguous segment's first and last non-zero position (a few
  integers per segment; segments are the block's runs that are contiguous in Caffe's order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gmm_quant._util.hosts import to_local
from gmm_quant.core import han
from gmm_quant.core.han import index_dtype


def sharded_axis(array) -> tuple[int, str] | None:
    """(dimension, mesh axis) of a ``jax.Array`` split over one mesh axis; None if not sharded."""
    sharding = getattr(array, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    split = [(d, e) for d, e in enumerate(sharding.spec) if e is not None]
    if not split or sharding.mesh.shape[_name(split[0][1])] == 1:
        return None
    if len(split) > 1 or (isinstance(split[0][1], tuple) and len(split[0][1]) > 1):
        raise ValueError(f"a layer split over several mesh axes ({sharding.spec}) is not supported")
    return split[0][0], _name(split[0][1])


def _name(entry) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


def _nearest(weights, centres):
    """``codebook.snap`` in jnp: index of the nearest centre, ties to the lower sorted position."""
    order = np.argsort(np.asarray(centres, np.float32), kind="stable")
    ordered = jnp.asarray(np.asarray(centres, np.float32)[order])
    if len(order) == 1:
        return jnp.zeros(weights.shape, jnp.int32)
    hi = jnp.clip(jnp.searchsorted(ordered, weights), 1, len(order) - 1)
    lo = hi - 1
    pick = jnp.where(jnp.abs(weights - ordered[lo]) <= jnp.abs(ordered[hi] - weights), lo, hi)
    return jnp.asarray(order, jnp.int32)[pick]


def member_counts(weights, centres) -> np.ndarray:
    """How many weights are nearest to each centre, counted per block and summed across devices."""
    _, axis = sharded_axis(weights)
    k = len(centres)

    def local(block):
        counts = jnp.zeros(k, jnp.int32).at[_nearest(block, centres).ravel()].add(1)
        return jax.lax.psum(counts, axis)

    spec = weights.sharding.spec
    run = jax.shard_map(local, mesh=weights.sharding.mesh, in_specs=(spec,), out_specs=PartitionSpec())
    return _host(jax.jit(run)(weights)).astype(np.int64)


def tightness(weights, means) -> float:
    """``codebook.tightness`` of one sharded layer: RMS distance to the nearest mean / std, reduced
    across devices (two scalars cross them)."""

    def measure(w):
        gap = w - jnp.asarray(np.asarray(means, np.float32))[_nearest(w, means)]
        return jnp.sqrt(jnp.mean(gap**2)) / (jnp.std(w) + 1e-12)

    return float(_host(jax.jit(measure)(weights)))


def snap(weights, centres):
    """Indices of the nearest centres, sharded like ``weights`` (never gathered)."""
    return snapper(weights.sharding, centres)(weights)


def snapper(sharding, centres):
    """The jitted elementwise snap for weights laid out by ``sharding`` (its output laid out alike)."""
    dtype = index_dtype(len(centres))
    return jax.jit(lambda w: _nearest(w, centres).astype(dtype), out_shardings=sharding)


def layer_cost(name: str, centres: int, indices) -> han.LayerCost:
    """``accounting.layer_cost`` of sharded ``indices`` (a layer with ``centres`` codebook entries)."""
    dim, axis = sharded_axis(indices)
    perm = han.CAFFE_PERM.get(indices.ndim, tuple(range(indices.ndim)))
    caffe_dim = perm.index(dim)
    devices = indices.sharding.mesh.shape[axis]
    shape = tuple(indices.shape[p] for p in perm)  # global, Caffe order
    pre, post = math.prod(shape[:caffe_dim]), math.prod(shape[caffe_dim + 1 :])
    seg_len = shape[caffe_dim] // devices * post
    max_diff = 1 << han.diff_field_bits(indices.ndim)
    codes, diffs, fillers, first, last = _local_stats(indices, perm, axis, pre, seg_len, centres, max_diff)
    # segment (p, d) starts at p * row + d * seg_len in Caffe order; walk them in that order
    row = shape[caffe_dim] * post
    starts = (np.arange(pre)[:, None] * row + np.arange(devices)[None, :] * seg_len).ravel()
    first, last = first.T.ravel(), last.T.ravel()  # [devices, pre] -> segment order
    filled = first >= 0
    g_first, g_last = starts[filled] + first[filled], starts[filled] + last[filled]
    gaps = g_first - np.concatenate([[-1], g_last[:-1]])  # each segment's first non-zero: its gap
    extra = (gaps - 1) // max_diff
    diffs = diffs + np.bincount(gaps - extra * max_diff, minlength=max_diff + 1)
    fillers = int(fillers + extra.sum())
    codes[0] += fillers
    diffs[max_diff] += fillers
    nonzero = int(codes[1:].sum())
    code_counts, diff_counts = dict(enumerate(codes.tolist())), dict(enumerate(diffs.tolist()))
    return han.cost_from_counts(name, math.prod(shape), centres, nonzero, fillers, code_counts, diff_counts)


def _local_stats(indices, perm, axis, pre, seg_len, k, max_diff):
    """Per device: histograms of indices and of within-segment gaps, and each segment's first and last
    non-zero position (-1: none); the histograms summed across devices."""

    def local(block):
        seg = jnp.transpose(block, perm).reshape(pre, seg_len).astype(jnp.int32)
        nz = seg != 0
        j = jnp.arange(seg_len, dtype=jnp.int32)
        upto = jax.lax.cummax(jnp.where(nz, j, -1), axis=1)
        prev = jnp.concatenate([jnp.full((pre, 1), -1, jnp.int32), upto[:, :-1]], axis=1)
        inner = nz & (prev >= 0)
        gap = j - prev
        fill = jnp.where(inner, (gap - 1) // max_diff, 0)
        diff = jnp.where(inner, gap - fill * max_diff, 0)
        diffs = jnp.zeros(max_diff + 1, jnp.int32).at[diff.ravel()].add(inner.ravel().astype(jnp.int32))
        codes = jnp.zeros(k, jnp.int32).at[seg.ravel()].add(nz.ravel().astype(jnp.int32))
        has = nz.any(axis=1)
        first = jnp.where(has, jnp.argmax(nz, axis=1), -1)
        last = jnp.where(has, seg_len - 1 - jnp.argmax(nz[:, ::-1], axis=1), -1)
        me, devices = jax.lax.axis_index(axis), jax.lax.axis_size(axis)
        rows = jnp.zeros((2, devices, pre), jnp.int32).at[:, me].set(jnp.stack([first, last]) + 1)
        return jax.lax.psum((codes, diffs, jnp.sum(fill), rows), axis)  # rows: a few integers per device

    spec = indices.sharding.spec
    run = jax.shard_map(local, mesh=indices.sharding.mesh, in_specs=(spec,), out_specs=PartitionSpec())
    codes, diffs, fill, rows = (_host(a).astype(np.int64) for a in jax.jit(run)(indices))
    return codes, diffs, int(fill), rows[0] - 1, rows[1] - 1


def _host(replicated) -> np.ndarray:
    return np.asarray(to_local(replicated))
